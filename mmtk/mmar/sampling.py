"""Loading a trained MMAR model and the ``mmtk mmar-generate`` / ``mmtk mmar-caption`` tools.

``mmar-generate`` writes ``generated.png`` (one image per caption, in order),
``generated.txt`` (the captions by grid index) and ``generated.h5`` (schema
``mmtk.mmar.generated/1``: ``images`` (B, R, R, 3) uint8 and ``captions``
(B,) strings). ``mmar-caption`` writes ``captions.jsonl``
with one ``{"image": ..., "caption": ...}`` object per image (plus
``"references"`` when the image came with captions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import torch

from mmtk.core.checkpoint import load_checkpoint, state_dict_mismatch
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


MODEL_ENTRIES = ("mmar_config", "model", "lora", "autoencoder", "vocabulary", "image")
# Trainer checkpoints carry a format entry too (CHECKPOINT_FORMAT, equal to MODEL_FORMAT), so these entries tell them apart.
TRAINER_ENTRIES = ("step", "optimizer")
MODEL_FILE_FIX = "The file is incomplete or was edited; pass the model.pt of a finished run."


def _describe_value(value: Any) -> str:
    """Describe ``value`` for a message: its type, and its repr when that is short."""
    text = repr(value)
    kind = type(value).__name__
    return f"{kind} {text}" if len(text) <= 60 else kind


def _first_line(exc: BaseException) -> str:
    """Return the first line of an exception's message, cut to 200 characters."""
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def _is_count(value: Any, minimum: int = 1) -> bool:
    """Return whether ``value`` is an int (not a bool) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: Any) -> bool:
    """Return whether ``value`` is a finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _entry_error(path: str | Path, entry: str, problem: str) -> InputError:
    """Return the InputError for a model.pt entry with a wrong type or value."""
    return InputError(f"{path}: entry '{entry}' {problem}. {MODEL_FILE_FIX}")


def _check_mapping(path: str | Path, entry: str, value: Any, keys: Sequence[str]) -> dict[str, Any]:
    """Return ``value`` when it is a mapping that contains ``keys``, else raise InputError."""
    if not isinstance(value, dict):
        raise _entry_error(path, entry, f"must be a mapping with the keys {', '.join(keys)}, found {_describe_value(value)}")
    missing = [key for key in keys if key not in value]
    if missing:
        raise _entry_error(path, entry, f"is missing the keys {', '.join(missing)}")
    return value


def _check_config_entry(path: str | Path, state: dict[str, Any]) -> None:
    config = _check_mapping(path, "mmar_config", state["mmar_config"], ("token_dim", "num_image_tokens", "backbone"))
    for key in ("token_dim", "num_image_tokens"):
        if not _is_count(config[key]):
            raise _entry_error(path, f"mmar_config.{key}", f"must be a positive integer, found {_describe_value(config[key])}")
    if not isinstance(config["backbone"], dict):
        raise _entry_error(path, "mmar_config.backbone", f"must be a mapping of DecoderConfig fields, found {_describe_value(config['backbone'])}")
    # MMAR accepts any image_attention string when it is built, so an unknown value would fail only once sampling starts.
    attention = config.get("image_attention", "bidirectional")
    if attention not in ("bidirectional", "causal"):
        raise _entry_error(path, "mmar_config.image_attention", f"must be 'bidirectional' or 'causal', found {_describe_value(attention)}")


def _check_tensor_mapping(path: str | Path, entry: str, weights: Any) -> None:
    if not isinstance(weights, dict):
        raise _entry_error(path, entry, f"must map parameter names to tensors, found {_describe_value(weights)}")
    for name, value in weights.items():
        if not isinstance(value, torch.Tensor):
            raise _entry_error(path, f"{entry}.{name}", f"must be a tensor, found {_describe_value(value)}")


def _check_lora_entry(path: str | Path, state: dict[str, Any]) -> None:
    lora = _check_mapping(path, "lora", state["lora"], ("rank", "alpha", "targets"))
    if not _is_count(lora["rank"], minimum=0):
        raise _entry_error(path, "lora.rank", f"must be an integer >= 0, found {_describe_value(lora['rank'])}")
    if lora["alpha"] is not None and not _is_number(lora["alpha"]):
        raise _entry_error(path, "lora.alpha", f"must be a number or None, found {_describe_value(lora['alpha'])}")
    targets = lora["targets"]
    if not isinstance(targets, (list, tuple)) or not all(isinstance(target, str) for target in targets):
        raise _entry_error(path, "lora.targets", f"must be a list of layer names, found {_describe_value(targets)}")


def _check_autoencoder_entry(path: str | Path, state: dict[str, Any]) -> None:
    entry = state["autoencoder"]
    pixels = isinstance(entry, dict) and entry.get("kind") == "pixels"
    entry = _check_mapping(path, "autoencoder", entry, ("kind", "scale_factor") if pixels else ("config", "autoencoder", "scale_factor"))
    if not _is_number(entry["scale_factor"]) or entry["scale_factor"] <= 0:
        raise _entry_error(path, "autoencoder.scale_factor", f"must be a positive number, found {_describe_value(entry['scale_factor'])}")
    if pixels:
        return
    if not isinstance(entry["config"], dict):
        raise _entry_error(path, "autoencoder.config", f"must be a mapping of AutoencoderConfig fields, found {_describe_value(entry['config'])}")
    _check_tensor_mapping(path, "autoencoder.autoencoder", entry["autoencoder"])


def _check_vocabulary_entry(path: str | Path, state: dict[str, Any]) -> None:
    vocabulary = _check_mapping(path, "vocabulary", state["vocabulary"], ("tokenizer", "base_ids", "max_tokens"))
    if not isinstance(vocabulary["tokenizer"], str) or not vocabulary["tokenizer"]:
        raise _entry_error(path, "vocabulary.tokenizer", f"must name a tokenizer ('bundled', 'shapes', a .gguf file or a folder), found {_describe_value(vocabulary['tokenizer'])}")
    base_ids = vocabulary["base_ids"]
    if base_ids is not None and (not isinstance(base_ids, list) or not all(_is_count(i, minimum=0) for i in base_ids)):
        raise _entry_error(path, "vocabulary.base_ids", f"must be a list of token ids or None, found {_describe_value(base_ids)}")
    if not _is_count(vocabulary["max_tokens"]):
        raise _entry_error(path, "vocabulary.max_tokens", f"must be a positive integer, found {_describe_value(vocabulary['max_tokens'])}")


def _check_image_entry(path: str | Path, state: dict[str, Any]) -> None:
    image = _check_mapping(path, "image", state["image"], ("patch_size", "latent_shape", "resolution"))
    for key in ("patch_size", "resolution"):
        if not _is_count(image[key]):
            raise _entry_error(path, f"image.{key}", f"must be a positive integer, found {_describe_value(image[key])}")
    shape = image["latent_shape"]
    if not isinstance(shape, (list, tuple)) or len(shape) != 3 or not all(_is_count(size) for size in shape):
        raise _entry_error(path, "image.latent_shape", f"must be three positive integers [channels, height, width], found {_describe_value(shape)}")


SAMPLE_RULES = {
    "iterations": ("a positive integer", _is_count),
    "steps": ("a positive integer", _is_count),
    "caption_tokens": ("a positive integer", _is_count),
    "cfg": ("a number >= 0", lambda value: _is_number(value) and value >= 0),
    "temperature": ("a number >= 0", lambda value: _is_number(value) and value >= 0),
    "eta": ("a number in [0, 1]", lambda value: _is_number(value) and 0 <= value <= 1),
    "cfg_schedule": ("'linear' or 'constant'", lambda value: value in ("linear", "constant")),
}


def _check_sample_entry(path: str | Path, state: dict[str, Any]) -> None:
    sample = state.get("sample", {})
    if not isinstance(sample, dict):
        raise _entry_error(path, "sample", f"must be a mapping of sampling settings, found {_describe_value(sample)}")
    for key, (expected, is_valid) in SAMPLE_RULES.items():
        if key in sample and not is_valid(sample[key]):
            raise _entry_error(path, f"sample.{key}", f"must be {expected}, found {_describe_value(sample[key])}")


def check_model_file_entries(state: dict[str, Any], path: str | Path) -> None:
    """Raise InputError when an entry of a train-mmar model.pt is missing or has the wrong type."""
    missing = [entry for entry in MODEL_ENTRIES if entry not in state]
    if missing:
        raise InputError(f"{path} lacks the entries {', '.join(missing)} that mmtk train-mmar writes into model.pt, so the file is incomplete or was edited; pass the model.pt of a finished run.")
    _check_config_entry(path, state)
    _check_tensor_mapping(path, "model", state["model"])
    _check_lora_entry(path, state)
    _check_autoencoder_entry(path, state)
    _check_vocabulary_entry(path, state)
    _check_image_entry(path, state)
    _check_sample_entry(path, state)


def check_image_geometry(image: dict[str, Any], config: dict[str, Any], autoencoder: Any, path: str | Path) -> None:
    """Raise InputError unless the ``image`` entry fits the autoencoder and the token count and size in ``mmar_config``.

    The autoencoder turns R px images into C x R/f x R/f latents (f its
    downsampling factor, C its latent channels). Patches of p x p latent
    pixels then give (R/(f p))^2 tokens of C p^2 values each.
    """
    patch, resolution = image["patch_size"], image["resolution"]
    channels, height, width = image["latent_shape"]
    factor, latent_channels = autoencoder.config.downsample_factor, autoencoder.config.embed_dim
    shape = f"image.latent_shape {list(image['latent_shape'])}"
    if channels != latent_channels:
        raise InputError(f"{path}: {shape} has {channels} channels, but the stored autoencoder makes latents with {latent_channels}. {MODEL_FILE_FIX}")
    if resolution % factor:
        raise InputError(f"{path}: image.resolution {resolution} px is not a multiple of the autoencoder's downsampling factor {factor}. {MODEL_FILE_FIX}")
    side = resolution // factor
    if (height, width) != (side, side):
        raise InputError(f"{path}: {shape} does not match image.resolution {resolution} px, which the autoencoder (downsampling factor {factor}) turns into latents of {side}x{side}. {MODEL_FILE_FIX}")
    if side % patch:
        raise InputError(f"{path}: image.patch_size {patch} does not divide the {side}x{side} latent grid of {shape}. {MODEL_FILE_FIX}")
    num_tokens, token_dim = (side // patch) ** 2, channels * patch * patch
    if num_tokens != config["num_image_tokens"]:
        raise InputError(f"{path}: {shape} with image.patch_size {patch} gives {num_tokens} image tokens, but mmar_config.num_image_tokens is {config['num_image_tokens']}. {MODEL_FILE_FIX}")
    if token_dim != config["token_dim"]:
        raise InputError(f"{path}: {shape} with image.patch_size {patch} gives tokens of dimension {token_dim}, but mmar_config.token_dim is {config['token_dim']}. {MODEL_FILE_FIX}")


def _autoencoder_weights_mismatch(entry: dict[str, Any]) -> str | None:
    """Describe how the stored autoencoder weights differ from those of its stored config, or return None."""
    from mmtk.nn.autoencoder import AutoencoderConfig, KLAutoencoder

    try:
        expected = KLAutoencoder(AutoencoderConfig(**entry["config"])).state_dict()
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError):
        return None
    return state_dict_mismatch(expected, entry["autoencoder"])


def _rebuild_autoencoder(state: dict[str, Any], path: str | Path) -> Any:
    from mmtk.mmar.tokens import image_tokenizer_from_state

    try:
        return image_tokenizer_from_state(state["autoencoder"])
    except InputError as exc:
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        mismatch = _autoencoder_weights_mismatch(state["autoencoder"]) if isinstance(cause, RuntimeError) else None
        if mismatch is not None:
            raise _entry_error(path, "autoencoder.autoencoder", f"does not match autoencoder.config: {mismatch}") from exc
        raise _entry_error(path, "autoencoder", f"cannot be rebuilt ({type(cause).__name__}: {_first_line(cause)})") from exc


def _rebuild_model(state: dict[str, Any], path: str | Path) -> Any:
    from mmtk.mmar.model import MMAR, config_from_mapping
    from mmtk.nn.lora import add_lora

    try:
        model = MMAR(config_from_mapping(state["mmar_config"]))
    except (TypeError, ValueError, KeyError, RuntimeError, ZeroDivisionError) as exc:
        raise _entry_error(path, "mmar_config", f"does not describe a model that can be built ({type(exc).__name__}: {_first_line(exc)})") from exc
    lora = state["lora"]
    if lora["rank"] > 0:
        try:
            add_lora(model.backbone, lora["targets"], rank=lora["rank"], alpha=lora["alpha"], freeze_base=False)
        except (TypeError, ValueError, KeyError) as exc:
            raise _entry_error(path, "lora", f"does not fit the decoder ({type(exc).__name__}: {_first_line(exc)})") from exc
    mismatch = state_dict_mismatch(model.state_dict(), state["model"])
    if mismatch is not None:
        raise _entry_error(path, "model", f"does not match mmar_config and lora: {mismatch}")
    model.load_state_dict(state["model"])
    model.backbone.tie_weights()
    return model


def load_mmar(path: str | Path, device: torch.device | str = "cpu") -> LoadedMMAR:
    """Load ``model.pt`` written by ``mmtk train-mmar``; raises InputError for a missing, foreign or broken file."""
    from mmtk.mmar.data import CaptionVocabulary, load_base_tokenizer
    from mmtk.mmar.train import MODEL_FORMAT, TOOL

    state = load_checkpoint(path, expected_tool=TOOL)
    if "mmar_config" not in state and all(entry in state for entry in TRAINER_ENTRIES):
        raise InputError(f"{path} is a {TOOL} training checkpoint, not its final model.pt; pass the model.pt in the run folder.")
    if state.get("format") != MODEL_FORMAT:
        raise InputError(f"{path} is a {TOOL} file but not its final model.pt (format {state.get('format')!r}); pass the model.pt of a finished run.")
    check_model_file_entries(state, path)
    for section in ("model", "lora", "autoencoder"):
        bad = non_finite_tensor(state.get(section))
        if bad is not None:
            raise InputError(f"{path}: tensor '{section}.{bad}' contains NaN or infinite values, so the model cannot sample; retrain or use an earlier checkpoint.")
    check_head_outputs(state, path)

    autoencoder = _rebuild_autoencoder(state, path)
    image = state["image"]
    check_image_geometry(image, state["mmar_config"], autoencoder, path)
    model = _rebuild_model(state, path)

    vocab_state = state["vocabulary"]
    try:
        tokenizer = load_base_tokenizer(vocab_state["tokenizer"])
    except InputError as exc:
        where = "that path"
        if not Path(vocab_state["tokenizer"]).is_absolute():
            where = "that path, which is relative to the folder train-mmar ran in (run this command from there)"
        raise InputError(
            f"{path}: entry 'vocabulary.tokenizer' names the tokenizer {vocab_state['tokenizer']!r}, which cannot be loaded. "
            f"The model needs the tokenizer it was trained with, so restore it at {where}. Details: {exc}"
        ) from exc
    vocabulary = CaptionVocabulary(tokenizer, vocab_state["base_ids"], vocab_state["max_tokens"])
    if vocabulary.base_ids is not None and vocabulary.size != model.backbone.config.vocab_size:
        raise _entry_error(path, "vocabulary.base_ids", f"lists {vocabulary.size} token ids, but the decoder in mmar_config has {model.backbone.config.vocab_size}")

    model.to(device).eval()
    autoencoder.to(device).eval()
    log.info("loaded %s: %d image tokens of dimension %d, pred %s, learn_sigma %s", path, model.config.num_image_tokens, model.config.token_dim, model.config.parameterisation, model.config.learn_sigma)
    return LoadedMMAR(model, autoencoder, vocabulary, image["patch_size"], tuple(image["latent_shape"]), image["resolution"], dict(state.get("sample", {})))


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
