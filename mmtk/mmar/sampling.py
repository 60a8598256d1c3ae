"""Loading a trained MMAR model and the ``mmtk mmar-generate`` / ``mmtk mmar-caption`` tools.

``mmar-generate`` writes ``generated.png`` (one image per caption, in order),
``generated.txt`` (the captions by grid index) and ``generated.h5`` (schema
``mmtk.mmar.generated/1``: ``images`` (B, R, R, 3) uint8 and ``captions``
(B,) strings). ``mmar-caption`` writes ``captions.jsonl``
with one ``{"image": ..., "caption": ...}`` object per image (plus
``"references"`` when the image came with captions).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import torch

from mmtk.core.errors import InputError, RecipeError
from mmtk.core.logging import get_logger
from mmtk.core.recipe import param

log = get_logger(__name__)

GENERATE_TOOL = "mmar-generate"
CAPTION_TOOL = "mmar-caption"
GENERATED_SCHEMA = "mmtk.mmar.generated/1"


@dataclass
class LoadedMMAR:
    """A trained model with everything needed to sample from it."""

    model: Any
    autoencoder: Any
    vocabulary: Any
    patch_size: int
    latent_shape: tuple[int, int, int]
    resolution: int
    sample: dict[str, Any] = field(default_factory=dict)


def non_finite_tensor(value: Any, name: str = "") -> str | None:
    """Return the dotted name of the first floating tensor in nested mappings or lists that contains NaN or infinity, else None."""
    if isinstance(value, torch.Tensor):
        return name if value.is_floating_point() and not bool(torch.isfinite(value).all()) else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = non_finite_tensor(item, f"{name}.{key}" if name else str(key))
        if found is not None:
            return found
    return None


HEAD_OUTPUT_WEIGHT = "diffusion.head.final_layer.linear.weight"


def check_head_outputs(state: dict[str, Any], path: str | Path) -> None:
    """Raise InputError when the stored head's output size disagrees with the stored ``learn_sigma`` setting.

    A head with a learned variance has 2 x token_dim outputs and one without
    has token_dim. Files saved before the setting existed count as without.
    """
    config = state.get("mmar_config")
    weights = state.get("model")
    if not isinstance(config, dict) or not isinstance(weights, dict) or HEAD_OUTPUT_WEIGHT not in weights or "token_dim" not in config:
        return
    learn_sigma = bool(config.get("learn_sigma", False))
    expected = int(config["token_dim"]) * (2 if learn_sigma else 1)
    found = int(weights[HEAD_OUTPUT_WEIGHT].shape[0])
    if found != expected:
        raise InputError(
            f"{path}: the diffusion head has {found} outputs, but its mmar_config (token_dim {config['token_dim']}, "
            f"learn_sigma {learn_sigma}) needs {expected}. The file was altered or written by another mmtk version; "
            "retrain, or use the model.pt the run wrote."
        )


def load_mmar(path: str | Path, device: torch.device | str = "cpu") -> LoadedMMAR:
    """Load ``model.pt`` written by ``mmtk train-mmar``; raises InputError for a missing, foreign or broken file."""
    from mmtk.core.checkpoint import load_checkpoint
    from mmtk.mmar.data import CaptionVocabulary, load_base_tokenizer
    from mmtk.mmar.model import MMAR, config_from_mapping
    from mmtk.mmar.train import MODEL_FORMAT, TOOL
    from mmtk.mmar.tokens import image_tokenizer_from_state
    from mmtk.nn.lora import add_lora

    state = load_checkpoint(path, expected_tool=TOOL)
    if state.get("format") != MODEL_FORMAT or "model" not in state:
        raise InputError(f"{path} is a {TOOL} file but not its final model.pt (format {state.get('format')!r}); pass the model.pt of a finished run.")
    for section in ("model", "lora", "autoencoder"):
        bad = non_finite_tensor(state.get(section))
        if bad is not None:
            raise InputError(f"{path}: tensor '{section}.{bad}' contains NaN or infinite values, so the model cannot sample; retrain or use an earlier checkpoint.")
    if "mmar_config" not in state:
        raise InputError(f"{path} is a {TOOL} training checkpoint, not its final model.pt; pass the model.pt in the run folder.")
    missing_sections = [section for section in ("lora", "autoencoder", "vocabulary", "image") if section not in state]
    if missing_sections:
        raise InputError(f"{path} lacks the entries {', '.join(missing_sections)} that mmtk train-mmar writes into model.pt, so the file is incomplete or was edited; pass the model.pt of a finished run.")
    check_head_outputs(state, path)
    try:
        model = MMAR(config_from_mapping(state["mmar_config"]))
        lora = state["lora"]
        if lora["rank"] > 0:
            add_lora(model.backbone, lora["targets"], rank=lora["rank"], alpha=lora["alpha"], freeze_base=False)
        model.load_state_dict(state["model"])
        model.backbone.tie_weights()
        autoencoder = image_tokenizer_from_state(state["autoencoder"])
        vocab_state = state["vocabulary"]
        image = state["image"]
    except KeyError as exc:
        raise InputError(f"cannot rebuild the model from {path}: the entry {exc} is missing, so the file is incomplete or was edited; pass the model.pt of a finished run.") from exc
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"cannot rebuild the model from {path}: {exc}") from exc
    tokenizer = load_base_tokenizer(vocab_state["tokenizer"])
    vocabulary = CaptionVocabulary(tokenizer, vocab_state["base_ids"], int(vocab_state["max_tokens"]))
    model.to(device).eval()
    autoencoder.to(device).eval()
    log.info("loaded %s: %d image tokens of dimension %d, pred %s, learn_sigma %s", path, model.config.num_image_tokens, model.config.token_dim, model.config.parameterisation, model.config.learn_sigma)
    return LoadedMMAR(model, autoencoder, vocabulary, int(image["patch_size"]), tuple(image["latent_shape"]), int(image["resolution"]), dict(state.get("sample", {})))


@torch.no_grad()
def decode_tokens(loaded: LoadedMMAR, tokens: torch.Tensor) -> torch.Tensor:
    """Decode image tokens (B, N, D) to images (B, 3, R, R) in [-1, 1]."""
    from mmtk.mmar.tokens import unpatchify

    channels, height, width = loaded.latent_shape
    latents = unpatchify(tokens.float(), loaded.patch_size, channels, height, width) / loaded.autoencoder.scale_factor
    return loaded.autoencoder.decode(latents).float().clamp(-1, 1)


@torch.no_grad()
def encode_images_to_tokens(loaded: LoadedMMAR, images: torch.Tensor) -> torch.Tensor:
    """Encode images (B, 3, R, R) in [-1, 1] to clean tokens (B, N, D) from the posterior means."""
    from mmtk.mmar.tokens import patchify

    latents = loaded.autoencoder.encode(images).mean * loaded.autoencoder.scale_factor
    return patchify(latents, loaded.patch_size)


def settings_from(sample: Any):
    """Return :class:`GenerationSettings` from a recipe's sample section."""
    from mmtk.mmar.generate import GenerationSettings

    return GenerationSettings(
        num_iterations=sample.iterations, num_sampling_steps=sample.steps, cfg_scale=sample.cfg,
        cfg_schedule=sample.cfg_schedule, temperature=sample.temperature, eta=sample.eta,
    )


def generate_images(loaded: LoadedMMAR, prompts: Sequence[str], sample: Any, generator: torch.Generator, batch_size: int = 16) -> torch.Tensor:
    """Generate one image per prompt; returns (B, 3, R, R) in [-1, 1]."""
    from mmtk.mmar.generate import generate_tokens

    settings = settings_from(sample)
    if settings.num_iterations > loaded.model.config.num_image_tokens:
        raise InputError(f"iterations={settings.num_iterations} exceeds the model's {loaded.model.config.num_image_tokens} image tokens; lower it.")
    prompt_ids = loaded.vocabulary.encode_prompts(prompts)
    images = []
    for start in range(0, len(prompts), batch_size):
        ids = prompt_ids[start : start + batch_size]
        tokens = generate_tokens(loaded.model, ids, loaded.vocabulary.bos_id, loaded.vocabulary.eos_id, settings, generator)
        images.append(decode_tokens(loaded, tokens))
    return torch.cat(images)


def generate_and_save(loaded: LoadedMMAR, prompts: Sequence[str], sample: Any, folder: Path, generator: torch.Generator) -> dict[str, Any]:
    """Generate images for ``prompts`` and write generated.png, generated.txt and generated.h5 into ``folder``."""
    from mmtk.core.hdf5 import write_datasets
    from mmtk.mmar.data import save_image_grid, to_uint8_images

    images = to_uint8_images(generate_images(loaded, prompts, sample, generator))
    grid = save_image_grid(folder / "generated.png", images, columns=min(8, len(prompts)), labels=list(prompts))
    store = write_datasets(folder / "generated.h5", {"images": images, "captions": list(prompts)}, schema=GENERATED_SCHEMA)
    log.info("generated %d images into %s", len(prompts), grid)
    return {"png": str(grid), "h5": str(store), "count": len(prompts)}


def caption_and_save(loaded: LoadedMMAR, cache, rows: Sequence[int], records: Sequence[Any], sample: Any, folder: Path, generator: torch.Generator) -> dict[str, Any]:
    """Caption cached held-out images (posterior means) and write captions.jsonl plus a grid of the photos."""
    from mmtk.core.io import write_text
    from mmtk.core.io import to_json
    from mmtk.mmar.data import save_image_grid, to_uint8_images
    from mmtk.mmar.generate import caption_tokens
    from mmtk.mmar.tokens import patchify

    device = next(loaded.model.parameters()).device
    means = cache.moments[list(rows)].chunk(2, dim=1)[0].to(device) * loaded.autoencoder.scale_factor
    tokens = patchify(means, loaded.patch_size)
    ids = caption_tokens(loaded.model, tokens, loaded.vocabulary.bos_id, loaded.vocabulary.eos_id, sample.caption_tokens, 0.0, generator)
    lines = []
    for record, caption_ids in zip(records, ids):
        lines.append(to_json({"image": record.path.name, "caption": loaded.vocabulary.decode(caption_ids), "references": record.captions}))
    path = write_text(folder / "captions.jsonl", "".join(line + "\n" for line in lines))
    photos = save_image_grid(folder / "captioned.png", to_uint8_images(decode_tokens(loaded, tokens)), columns=min(8, len(records)))
    log.info("captioned %d held-out photos into %s", len(records), path)
    return {"jsonl": str(path), "png": str(photos), "count": len(records)}


# ------------------------------------------------------------------ tools


@dataclass
class GenerateRecipe:
    """Recipe of ``mmtk mmar-generate``."""

    seed: int = param(0, help="random seed")
    device: str = param("cpu", help="torch device")
    threads: int = param(0, min=0, help="torch CPU threads (0 keeps torch's default)")
    checkpoint: Optional[Path] = param(None, help="model.pt of a train-mmar run")
    captions: Optional[Path] = param(None, help="text file with one caption per line")
    iterations: Optional[int] = param(None, min=1, help="masked-autoregressive iterations (null: the model's training recipe)")
    steps: Optional[int] = param(None, min=1, help="diffusion sampling steps per iteration (null: from the model)")
    cfg: Optional[float] = param(None, min=0.0, help="classifier-free guidance scale (null: from the model)")
    cfg_schedule: Optional[Literal["linear", "constant"]] = param(None, help="linear or constant guidance (null: from the model)")
    temperature: Optional[float] = param(None, min=0.0, help="sampler noise temperature (null: from the model)")
    eta: Optional[float] = param(None, min=0.0, max=1.0, help="1: DDPM steps, 0: DDIM (null: from the model)")


@dataclass
class CaptionRecipe:
    """Recipe of ``mmtk mmar-caption``."""

    seed: int = param(0, help="random seed")
    device: str = param("cpu", help="torch device")
    threads: int = param(0, min=0, help="torch CPU threads (0 keeps torch's default)")
    checkpoint: Optional[Path] = param(None, help="model.pt of a train-mmar run")
    images: list[Path] = param(default_factory=list, help="image files to caption")
    max_tokens: int = param(24, min=1, help="maximum caption (or answer) length in tokens")
    temperature: float = param(0.0, min=0.0, help="0: greedy captions, else the sampling temperature")
    question: Optional[str] = param(None, help="a question asked about every image; null captions the images instead")


SAMPLING_KEYS = ("iterations", "steps", "cfg", "cfg_schedule", "temperature", "eta")


def _resolved_sample(recipe: GenerateRecipe, stored: dict[str, Any]):
    from types import SimpleNamespace

    from mmtk.mmar.recipe import MMARSample

    values = {**vars(MMARSample()), **stored}
    for key in SAMPLING_KEYS:
        if getattr(recipe, key) is not None:
            values[key] = getattr(recipe, key)
    return SimpleNamespace(**values)


def run_generate(context) -> dict[str, Any]:
    """Entry point of ``mmtk mmar-generate``."""
    from mmtk.mmar.data import read_prompt_file

    recipe: GenerateRecipe = context.recipe
    if recipe.threads > 0:
        torch.set_num_threads(recipe.threads)
    if recipe.checkpoint is None:
        raise RecipeError("missing recipe key 'checkpoint': pass checkpoint=RUN/model.pt.")
    if recipe.captions is None:
        raise RecipeError("missing recipe key 'captions': pass captions=FILE with one caption per line.")
    prompts = read_prompt_file(recipe.captions)
    from mmtk.core.distributed import resolve_device

    device = resolve_device(recipe.device)
    loaded = load_mmar(recipe.checkpoint, device)
    sample = _resolved_sample(recipe, loaded.sample)
    if sample.iterations > loaded.model.config.num_image_tokens:
        raise RecipeError(f"recipe key 'iterations': {sample.iterations} exceeds the model's {loaded.model.config.num_image_tokens} image tokens; lower it.")

    context.start()
    log.info("generating %d images for the captions in %s (iterations %d, steps %d, cfg %g, eta %g)", len(prompts), recipe.captions, sample.iterations, sample.steps, sample.cfg, sample.eta)
    generator = torch.Generator().manual_seed(recipe.seed)
    result = generate_and_save(loaded, prompts, sample, context.run.path, generator)
    return {"generated": result, "settings": {key: getattr(sample, key) for key in SAMPLING_KEYS}}


def run_caption(context) -> dict[str, Any]:
    """Entry point of ``mmtk mmar-caption``."""
    from mmtk.core.distributed import resolve_device
    from mmtk.core.io import to_json, write_text
    from mmtk.mmar.data import check_image_size, square_image
    from mmtk.mmar.generate import caption_tokens
    from mmtk.nn.image import load_image

    recipe: CaptionRecipe = context.recipe
    if recipe.threads > 0:
        torch.set_num_threads(recipe.threads)
    if recipe.checkpoint is None:
        raise RecipeError("missing recipe key 'checkpoint': pass checkpoint=RUN/model.pt.")
    if not recipe.images:
        raise RecipeError("recipe key 'images' is empty: pass images=[a.jpg,b.jpg].")
    if recipe.question is not None and not recipe.question.strip():
        raise RecipeError("recipe key 'question' is empty: pass a question, or question=null to caption the images.")
    device = resolve_device(recipe.device)
    loaded = load_mmar(recipe.checkpoint, device)
    prefixes = None
    if recipe.question is not None:
        from mmtk.mmar.data import normalise_caption

        vocabulary = loaded.vocabulary
        length = len(vocabulary.tokenizer.encode(normalise_caption(recipe.question), add_special_tokens=False))
        if length > vocabulary.max_tokens:
            raise RecipeError(f"recipe key 'question' has {length} tokens, but the model reads at most {vocabulary.max_tokens}; ask a shorter question.")
        prefixes = vocabulary.encode_prompts([recipe.question]) * len(recipe.images)
    pixels = []
    for path in recipe.images:
        image = load_image(path)
        check_image_size(image, loaded.resolution, str(path))
        pixels.append(square_image(image, loaded.resolution))

    context.start()
    task = "answering" if prefixes is not None else "captioning"
    log.info("%s %d images with %s", task, len(pixels), recipe.checkpoint)
    images = torch.stack(pixels).to(device)
    tokens = encode_images_to_tokens(loaded, images)
    generator = torch.Generator().manual_seed(recipe.seed)
    ids = caption_tokens(loaded.model, tokens, loaded.vocabulary.bos_id, loaded.vocabulary.eos_id, recipe.max_tokens, recipe.temperature, generator, prefixes=prefixes)
    captions = [loaded.vocabulary.decode(i) for i in ids]

    records = [{"image": str(path), "caption": caption} for path, caption in zip(recipe.images, captions)]
    if recipe.question is not None:
        records = [{"image": r["image"], "question": recipe.question, "answer": r["caption"]} for r in records]
    output = write_text(context.run.file("captions.jsonl"), "".join(to_json(r) + "\n" for r in records))
    for path, caption in zip(recipe.images, captions):
        context.console.print(f"{Path(path).name}: {caption}")
    log.info("finished %s %d images; wrote %s", task, len(records), output)
    return {"captions": records, "jsonl": str(output)}
