"""``mmtk train-mmar``: train MMAR on captioned photos, then generate and caption held-out ones.

The pipeline reads the photos and captions and encodes the photos once into a
latent cache (HDF5) with the frozen autoencoder. It then builds the caption
vocabulary and the model and trains with the shared trainer, on mixed
text-to-image and image-to-text batches with staged mask ratios. Last, it
writes ``model.pt`` and, on held-out data, ``generated.png`` and ``captions.jsonl``.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.utils.data import Dataset

from mmtk.core.errors import InputError, RecipeError
from mmtk.core.logging import get_logger
from mmtk.core.trainer import Trainer, TrainingTask, unwrap_model
from mmtk.mmar.data import CaptionVocabulary, LatentCache, sample_latents
from mmtk.mmar.layout import build_sequences
from mmtk.mmar.recipe import MMARRecipe
from mmtk.mmar.tokens import patchify, random_masks, sample_mask_ratios

log = get_logger(__name__)

TOOL = "train-mmar"
MODEL_FORMAT = 1


# ------------------------------------------------------------------- data


class CaptionedLatents(Dataset):
    """Training samples: a latent drawn from a cached posterior, one caption's ids and one image-to-text target's ids.

    Each item is ``(latent (C, h, w), caption ids, text ids, u)``. The
    caption is the text-to-image prompt. The text is what an image-to-text
    sample predicts: a caption, or for the shapes data also a question with
    its answer. ``u`` is a uniform number that decides caption dropout in
    :meth:`MMARTask.collate`. ``texts`` defaults to ``captions``.
    """

    def __init__(self, cache: LatentCache, rows: list[int], captions: list[list[list[int]]], flip: bool, texts: list[list[list[int]]] | None = None) -> None:
        self.cache = cache
        self.rows = rows
        self.captions = captions
        self.texts = texts if texts is not None else captions
        self.flip = flip

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[int], list[int], float]:
        row = self.rows[index]
        moments = self.cache.moments_flipped[row] if self.flip and random.random() < 0.5 else self.cache.moments[row]
        latent = sample_latents(moments) * self.cache.scale_factor  # (C, h, w)
        caption = random.choice(self.captions[index])
        text = random.choice(self.texts[index])
        return latent, caption, text, random.random()


def stage_at(recipe: MMARRecipe, step: int):
    """Return the mask-ratio stage that covers optimizer ``step``."""
    for stage in recipe.stages:
        if step < stage.until_step:
            return stage
    return recipe.stages[-1]


class MMARTask(TrainingTask):
    """The MMAR training job for the shared trainer."""

    def __init__(self, recipe: MMARRecipe, dataset: CaptionedLatents, vocabulary: CaptionVocabulary, build) -> None:
        self.recipe = recipe
        self.dataset = dataset
        self.vocabulary = vocabulary
        self._build = build
        self.trainer: Trainer | None = None

    def build_model(self):
        return self._build()

    def train_dataset(self) -> Dataset:
        return self.dataset

    def parameter_groups(self, model, config):
        from mmtk.core.optim import default_parameter_groups

        return default_parameter_groups(model, config.weight_decay)

    def collate(self, samples: list[tuple[torch.Tensor, list[int], list[int], float]]) -> dict[str, Any]:
        """Stack latents into tokens and lay out the sequences.

        The first ``round(t2i_fraction * B)`` samples become text-to-image
        (at least one of each kind when the fraction is strictly between 0
        and 1 and B > 1), so every micro-batch exercises both losses.
        """
        data = self.recipe.data
        batch = len(samples)
        num_t2i = round(data.t2i_fraction * batch)
        if 0.0 < data.t2i_fraction < 1.0 and batch > 1:
            num_t2i = min(max(num_t2i, 1), batch - 1)
        tasks = ["t2i"] * num_t2i + ["i2t"] * (batch - num_t2i)

        captions = []
        for task, (_, caption, text, u) in zip(tasks, samples):
            if task == "i2t":
                captions.append(text)
            else:
                captions.append([] if u < data.caption_dropout else caption)
        latents = torch.stack([s[0] for s in samples])  # (B, C, h, w)
        tokens = patchify(latents, self.recipe.autoencoder.patch_size)  # (B, N, D)
        sequences = build_sequences(tasks, captions, tokens.shape[1], self.vocabulary.bos_id, self.vocabulary.eos_id)
        return {"tokens": tokens, "kinds": sequences.kinds, "text_ids": sequences.text_ids, "image_start": sequences.image_start, "targets": sequences.targets, "num_t2i": num_t2i}

    def training_step(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, Mapping[str, Any]]:
        from mmtk.mmar.layout import SequenceBatch

        step = self.trainer.step if self.trainer is not None else 0
        stage = stage_at(self.recipe, step)
        tokens = batch["tokens"]
        batch_size, num_tokens = tokens.shape[:2]
        num_t2i = int(batch["num_t2i"])

        ratios = sample_mask_ratios(num_t2i, stage.mask_min, stage.mask_max, stage.distribution)
        mask = torch.zeros(batch_size, num_tokens, dtype=torch.bool)
        if num_t2i:
            mask[:num_t2i] = random_masks(ratios, num_tokens, min_masked=1)
        mask = mask.to(tokens.device)

        tasks = ["t2i"] * num_t2i + ["i2t"] * (batch_size - num_t2i)
        sequences = SequenceBatch(batch["kinds"], batch["text_ids"], batch["image_start"], batch["targets"], tasks)
        loss_weights = self.recipe.loss
        return model(sequences, tokens, mask, loss_weights.image_weight, loss_weights.text_weight)


# ------------------------------------------------------------ components


def load_autoencoder(section) -> Any:
    """Load the frozen image tokenizer: pixel patches, an mmtk autoencoder checkpoint or LDM KL-16 weights.

    Raises InputError or RecipeError when it is unusable with the recipe's resolution and patch size.
    """
    from mmtk.core.checkpoint import load_checkpoint
    from mmtk.mmar.tokens import PixelTokenizer
    from mmtk.nn.autoencoder import KLAutoencoder, autoencoder_from_checkpoint_state, ldm_kl16_config, load_autoencoder_weights

    if section.kind == "pixels":
        model = PixelTokenizer()
    elif section.checkpoint is not None:
        from mmtk.mmar.kl_autoencoder import TOOL as AUTOENCODER_TOOL

        state = load_checkpoint(section.checkpoint, expected_tool=AUTOENCODER_TOOL)
        model = autoencoder_from_checkpoint_state(state)
    else:
        model = load_autoencoder_weights(KLAutoencoder(ldm_kl16_config(), scale_factor=0.0), section.weights)
    if section.scale_factor is not None:
        model.scale_factor = section.scale_factor
    if section.resolution % model.config.downsample_factor:
        raise RecipeError(f"recipe key 'autoencoder.resolution': {section.resolution} px is not a multiple of the autoencoder's downsampling factor {model.config.downsample_factor}.")
    latent_side = section.resolution // model.config.downsample_factor
    if latent_side % section.patch_size:
        raise RecipeError(f"recipe key 'autoencoder.patch_size': {section.patch_size} does not divide the {latent_side}x{latent_side} latent grid.")
    model.requires_grad_(False)
    log.info("image tokenizer: %s, %d px images, %dx%d latent grid, patch size %d", section.kind, section.resolution, latent_side, latent_side, section.patch_size)
    return model.eval()


def read_centre_crops(records, resolution: int) -> torch.Tensor:
    """Decode every photo, reject those below ``resolution`` px, and centre-crop them; returns (M, 3, R, R) in [-1, 1].

    Raises InputError for an unreadable or too small photo, so that a rejected run writes nothing.
    """
    from mmtk.mmar.data import check_image_size, square_image
    from mmtk.nn.image import load_image

    crops = []
    for record in records:
        image = load_image(record.path)  # (3, H, W) uint8
        check_image_size(image, resolution, str(record.path))
        crops.append(square_image(image, resolution))
    return torch.stack(crops)  # (M, 3, R, R)


def build_latent_cache(autoencoder, records, images: torch.Tensor, resolution: int, path: Path) -> Path:
    """Encode the centre crops ``images`` (M, 3, R, R) of ``records`` and write the latent cache."""
    from mmtk.mmar.data import encode_images, write_latent_cache
    from mmtk.mmar.kl_autoencoder import estimate_scale_factor
    from mmtk.mmar.tokens import PixelTokenizer

    log.info("encoding %d images of %d px into the latent cache %s", len(records), resolution, path)
    started = time.perf_counter()
    moments, moments_flipped = encode_images(autoencoder, images)
    if not autoencoder.scale_factor:
        autoencoder.scale_factor = estimate_scale_factor(autoencoder, images)
        log.info("estimated the latent scale factor: %.4f", autoencoder.scale_factor)
    description = "pixels" if isinstance(autoencoder, PixelTokenizer) else f"KLAutoencoder {asdict(autoencoder.config)}"
    write_latent_cache(path, records, moments, moments_flipped, autoencoder.scale_factor, resolution, description)
    log.info("encoded %d photos into %s in %.1f s", len(records), path, time.perf_counter() - started)
    return path


def build_backbone(recipe: MMARRecipe, vocabulary: CaptionVocabulary):
    """Return the decoder: pretrained (optionally truncated, with a compact vocabulary) or randomly initialised."""
    from mmtk.nn.llm import DecoderConfig, DecoderLM

    section = recipe.backbone
    if section.pretrained is None:
        config = DecoderConfig(
            vocab_size=vocabulary.size, hidden_size=section.hidden_size, intermediate_size=section.intermediate_size,
            num_layers=section.num_layers, num_heads=section.num_heads, num_kv_heads=section.num_kv_heads,
            max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=vocabulary.bos_id, eos_token_id=vocabulary.eos_id,
        )
        return DecoderLM(config)

    from mmtk.nn.loaders import load_pretrained

    loaded = load_pretrained(None if section.pretrained == "bundled" else section.pretrained)
    model = loaded.model
    if section.keep_layers is not None and section.keep_layers < model.config.num_layers:
        model.layers = model.layers[: section.keep_layers]
        model.config.num_layers = section.keep_layers
    if vocabulary.base_ids is not None:
        rows = torch.tensor(vocabulary.base_ids, dtype=torch.long)
        embedding = torch.nn.Embedding(len(rows), model.config.hidden_size)
        embedding.weight.data.copy_(model.embed_tokens.weight.data[rows])
        head = torch.nn.Linear(model.config.hidden_size, len(rows), bias=False)
        head.weight.data.copy_(model.lm_head.weight.data[rows])
        model.embed_tokens, model.lm_head = embedding, head
        model.config.vocab_size = len(rows)
        model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = vocabulary.bos_id, vocabulary.eos_id, vocabulary.PAD
        model.tie_weights()
    return model


def build_model(recipe: MMARRecipe, vocabulary: CaptionVocabulary, token_dim: int, num_tokens: int):
    """Return the MMAR model, with LoRA on the decoder when the recipe sets a rank."""
    from mmtk.mmar.model import MMAR, MMARConfig
    from mmtk.nn.lora import add_lora

    backbone = build_backbone(recipe, vocabulary)
    section = recipe.model
    config = MMARConfig(
        token_dim=token_dim, num_image_tokens=num_tokens, backbone=backbone.config.to_dict(),
        vit_width=section.vit_width, vit_depth=section.vit_depth, vit_heads=section.vit_heads,
        head_width=section.head_width, head_depth=section.head_depth, parameterisation=section.pred, learn_sigma=section.learn_sigma,
        diffusion_steps=section.diffusion_steps, diffusion_batch_mul=section.diffusion_batch_mul, image_attention=section.image_attention,
    )
    model = MMAR(config, backbone)
    if recipe.backbone.lora_rank > 0:
        add_lora(backbone, recipe.backbone.lora_targets, rank=recipe.backbone.lora_rank, alpha=recipe.backbone.lora_alpha, freeze_base=True)
        if recipe.backbone.train_embeddings:
            backbone.embed_tokens.weight.requires_grad_(True)
            backbone.lm_head.weight.requires_grad_(True)
    return model


def stored_tokenizer_source(source: str) -> str:
    """Return the tokenizer source to store in model.pt: a file or folder path made absolute, so the file loads from any folder."""
    if source in ("bundled", "shapes"):
        return source
    return str(Path(source).expanduser().resolve())


def model_file_state(model, ema, recipe: MMARRecipe, vocabulary: CaptionVocabulary, autoencoder, latent_shape: tuple[int, int, int]) -> dict[str, Any]:
    """Return the self-contained mapping saved as ``model.pt`` (EMA weights when EMA is on)."""
    from mmtk.core.recipe import to_dict
    from mmtk.mmar.tokens import image_tokenizer_state

    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if ema is not None:
        for name, shadow in ema.shadow.items():
            state[name] = shadow.detach().cpu().to(state[name].dtype)
    return {
        "tool": TOOL,
        "format": MODEL_FORMAT,
        "mmar_config": model.config.to_dict(),
        "model": state,
        "lora": {"rank": recipe.backbone.lora_rank, "alpha": recipe.backbone.lora_alpha, "targets": list(recipe.backbone.lora_targets)},
        "vocabulary": {"base_ids": vocabulary.base_ids, "tokenizer": stored_tokenizer_source(recipe.text.tokenizer), "max_tokens": vocabulary.max_tokens},
        "image": {"patch_size": recipe.autoencoder.patch_size, "latent_shape": list(latent_shape), "resolution": recipe.autoencoder.resolution},
        "autoencoder": image_tokenizer_state(autoencoder),
        "sample": to_dict(recipe.sample),
    }


# ------------------------------------------------------------------ entry


def run(context) -> dict[str, Any]:
    """Entry point of ``mmtk train-mmar``."""
    from mmtk.core.checkpoint import save_checkpoint
    from mmtk.mmar.data import load_base_tokenizer, read_coco_mini, read_latent_cache, split_heldout
    from mmtk.mmar.model import trainable_parameter_count

    recipe: MMARRecipe = context.recipe
    if recipe.threads > 0:
        torch.set_num_threads(recipe.threads)
    wall_start = time.perf_counter()

    # Validate every input before the run folder exists.
    shapes = None
    if recipe.data.source == "shapes":
        from mmtk.mmar.shapes import make_shapes, shape_records

        shapes = make_shapes(recipe.data.num_images, recipe.autoencoder.resolution, recipe.seed)
        ordered = shape_records(shapes)
    else:
        records = read_coco_mini(recipe.data.images)
        ordered, _ = split_heldout(records, 0)
    train_rows = [i for i in range(len(ordered)) if not (recipe.data.heldout_every and i % recipe.data.heldout_every == recipe.data.heldout_every - 1)]
    training = set(train_rows)
    heldout_rows = [i for i in range(len(ordered)) if i not in training]
    if len(train_rows) < recipe.train.batch_size:
        raise RecipeError(f"only {len(train_rows)} training images, fewer than train.batch_size={recipe.train.batch_size}; lower the batch size.")
    autoencoder = load_autoencoder(recipe.autoencoder)
    latent_side = recipe.autoencoder.resolution // autoencoder.config.downsample_factor
    image_tokens = (latent_side // recipe.autoencoder.patch_size) ** 2
    if recipe.sample.iterations > image_tokens:
        raise RecipeError(f"recipe key 'sample.iterations': {recipe.sample.iterations} exceeds the {image_tokens} image tokens; lower it.")
    if recipe.data.latent_cache is not None:
        cache = read_latent_cache(recipe.data.latent_cache)
        if len(cache.names) != len(ordered) or cache.resolution != recipe.autoencoder.resolution:
            raise InputError(f"latent cache {recipe.data.latent_cache} contains {len(cache.names)} images at {cache.resolution} px, but the recipe has {len(ordered)} images at {recipe.autoencoder.resolution} px; set data.latent_cache: null to rebuild it.")
        if cache.image_ids != [r.image_id for r in ordered] or cache.names != [r.path.name for r in ordered]:
            raise InputError(f"latent cache {recipe.data.latent_cache} contains other photos than {recipe.data.images} (image ids or file names differ); set data.latent_cache: null to rebuild it.")
        expected = (2 * autoencoder.config.embed_dim, latent_side, latent_side)  # (2C, h, w)
        if tuple(cache.moments.shape[1:]) != expected:
            raise InputError(f"latent cache {recipe.data.latent_cache} has moments of shape {tuple(cache.moments.shape[1:])} per image, but the autoencoder gives {expected}; the cache comes from another autoencoder, so set data.latent_cache: null to rebuild it.")
        crops = None
    elif shapes is not None:
        crops = shapes.images  # (M, 3, R, R)
    else:
        crops = read_centre_crops(ordered, recipe.autoencoder.resolution)  # (M, 3, R, R)
    tokenizer = load_base_tokenizer(recipe.text.tokenizer)
    train_captions = [c for i in train_rows for c in ordered[i].captions]
    if shapes is not None:
        train_captions += [a for i in train_rows for a in shapes.answers[i]]
    if recipe.text.compact_vocab:
        vocabulary = CaptionVocabulary.from_captions(tokenizer, train_captions, recipe.text.max_tokens)
    else:
        vocabulary = CaptionVocabulary(tokenizer, None, recipe.text.max_tokens)

    context.start()
    cache_path = recipe.data.latent_cache or build_latent_cache(autoencoder, ordered, crops, recipe.autoencoder.resolution, context.run.file("latents.h5"))
    cache = read_latent_cache(cache_path)
    if recipe.autoencoder.scale_factor is None:
        autoencoder.scale_factor = cache.scale_factor
    latent_shape = tuple(cache.moments.shape[1:])
    latent_shape = (latent_shape[0] // 2, latent_shape[1], latent_shape[2])
    patch = recipe.autoencoder.patch_size
    token_dim = latent_shape[0] * patch * patch
    num_tokens = (latent_shape[1] // patch) * (latent_shape[2] // patch)

    captions = [[vocabulary.encode(c) for c in ordered[i].captions] for i in train_rows]
    texts = None
    if shapes is not None:
        texts = [captions[j] + [vocabulary.encode(a) for a in shapes.answers[i]] for j, i in enumerate(train_rows)]
    dataset = CaptionedLatents(cache, train_rows, captions, recipe.data.flip, texts)
    task = MMARTask(recipe, dataset, vocabulary, lambda: build_model(recipe, vocabulary, token_dim, num_tokens))
    trainer = Trainer(task, recipe.train, context.run, seed=recipe.seed, device=recipe.device, console=context.console)
    task.trainer = trainer
    log.info("MMAR: %d training images, %d held out, %d tokens of dimension %d per image, vocabulary %d", len(train_rows), len(heldout_rows), num_tokens, token_dim, vocabulary.size)
    result = trainer.fit()

    model = trainer.model
    model_path = context.run.file("model.pt")
    if context.run.writer:
        save_checkpoint(model_path, model_file_state(unwrap_model(model), trainer.ema, recipe, vocabulary, autoencoder, latent_shape))
        log.info("wrote the sampling model %s", model_path)
    summary: dict[str, Any] = {
        "model": str(model_path),
        "trainable_parameters": trainable_parameter_count(model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens_per_image": num_tokens,
        "token_dim": token_dim,
        "vocabulary_size": vocabulary.size,
        "train": result,
    }

    if context.run.writer and heldout_rows and (recipe.sample.num_images or recipe.sample.num_captions):
        from mmtk.mmar.sampling import LoadedMMAR, caption_and_save, generate_and_save

        if trainer.ema is not None:
            trainer.ema.copy_to(model)
        loaded = LoadedMMAR(model=model.eval(), autoencoder=autoencoder.to(next(model.parameters()).device), vocabulary=vocabulary, patch_size=patch, latent_shape=latent_shape, resolution=recipe.autoencoder.resolution)
        generator = torch.Generator().manual_seed(recipe.seed)
        heldout = [ordered[i] for i in heldout_rows]
        if recipe.sample.num_images:
            prompts = [r.captions[0] for r in heldout][: recipe.sample.num_images]
            started = time.perf_counter()
            summary["generated"] = generate_and_save(loaded, prompts, recipe.sample, context.run.path, generator)
            summary["generation_s"] = round(time.perf_counter() - started, 2)
        if recipe.sample.num_captions:
            started = time.perf_counter()
            rows = heldout_rows[: recipe.sample.num_captions]
            summary["captions"] = caption_and_save(loaded, cache, rows, [ordered[i] for i in rows], recipe.sample, context.run.path, generator)
            summary["captioning_s"] = round(time.perf_counter() - started, 2)
    summary["wall_s"] = round(time.perf_counter() - wall_start, 2)
    return summary
