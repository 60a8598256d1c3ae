"""``mmtk train-kl-autoencoder``: train a small KL autoencoder on real photos for CPU-scale MMAR runs.

The data are the coco-mini photos (minus the held-out images that MMAR
captions later) and, optionally, the colour photos bundled with
scikit-image. Each sample is a random square crop (a side of
``crop_scale_min``..1 of the shorter side), resized to ``resolution`` and
mirrored half of the time. The loss is the LDM autoencoder loss without its
perceptual and adversarial terms: mean absolute pixel error plus
``kl_weight`` times the posterior KL divergence per pixel.

Outputs in the run folder: ``autoencoder.pt`` (weights, architecture and
the latent ``scale_factor``), ``reconstructions.png`` (held-out photos on
odd rows, their reconstructions below) and the trainer's checkpoints.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import torch
from torch.utils.data import Dataset

from mmtk.core.errors import RecipeError
from mmtk.core.logging import get_logger
from mmtk.core.recipe import param
from mmtk.core.trainer import TrainConfig, Trainer, TrainingTask

log = get_logger(__name__)

TOOL = "train-kl-autoencoder"


@dataclass
class PhotoData:
    """Source folder of the training photos and their random crops."""

    images: Path = param(Path("../shared/data/coco-mini"), help="folder with captions.jsonl and images/ (coco-mini layout)")
    heldout_every: int = param(10, min=0, help="every n-th image in image-id order is held out for evaluation (0: none); keep equal to train-mmar's data.heldout_every")
    skimage_photos: bool = param(True, help="also train on the colour photos bundled with scikit-image")
    resolution: int = param(64, min=8, help="training crop size in px; a multiple of the downsampling factor")
    crop_scale_min: float = param(0.6, min=0.05, max=1.0, help="smallest crop side as a fraction of the shorter image side")
    samples_per_epoch: int = param(2048, min=1, help="random crops drawn per epoch (the photos repeat with new crops)")


@dataclass
class AutoencoderSection:
    """Architecture: ``small`` uses the fields below, ``ldm-kl16`` the LDM KL-16 model (fields ignored)."""

    preset: Literal["custom", "ldm-kl16"] = param("custom", help="custom (fields below) or ldm-kl16")
    channels: int = param(16, min=1, help="base channel count")
    channel_mult: list[int] = param(default_factory=lambda: [1, 2, 2, 4], help="channel multiplier per resolution level; downsampling is 2^(levels-1)")
    num_res_blocks: int = param(1, min=1, help="residual blocks per encoder level")
    attn_resolutions: list[int] = param(default_factory=list, help="feature-map sizes in px that get self-attention")
    embed_dim: int = param(4, min=1, help="latent channels C")
    norm_groups: int = param(8, min=1, help="GroupNorm groups; must divide every channel count")
    weights: Optional[Path] = param(None, help="initialise from local weights (.ckpt, .pt or .safetensors) in LDM layout")


@dataclass
class AutoencoderLoss:
    """Loss weights."""

    kl_weight: float = param(1e-6, min=0.0, help="weight of the KL divergence (summed over latent elements) per image pixel value")


@dataclass
class AutoencoderTrain(TrainConfig):
    """Training defaults for the small autoencoder."""

    steps: int = param(300, min=1, help="optimizer steps")
    batch_size: int = param(16, min=1, help="global batch size")
    lr: float = param(2e-3, min=0.0, help="peak learning rate")
    betas: tuple[float, ...] = param((0.5, 0.9), help="AdamW's (beta1, beta2), as LDM's autoencoder uses")
    weight_decay: float = param(0.0, min=0.0, help="decoupled weight decay")
    warmup_steps: int = param(20, min=0, help="linear warm-up steps")
    log_every: int = param(20, min=1, help="steps between metric records")
    checkpoint_every: int = param(0, min=0, help="steps between checkpoints (0: end and SIGTERM only)")


@dataclass
class AutoencoderRecipe:
    """Recipe of ``mmtk train-kl-autoencoder``."""

    seed: int = param(0, help="random seed")
    device: str = param("cpu", help="torch device: cpu, cuda, cuda:1 or auto")
    threads: int = param(0, min=0, help="torch CPU threads (0 keeps torch's default)")
    data: PhotoData = field(default_factory=PhotoData)
    model: AutoencoderSection = field(default_factory=AutoencoderSection)
    loss: AutoencoderLoss = field(default_factory=AutoencoderLoss)
    train: AutoencoderTrain = field(default_factory=AutoencoderTrain)


def autoencoder_config(section: AutoencoderSection, resolution: int):
    """Return the :class:`AutoencoderConfig` a recipe section describes."""
    from mmtk.nn.autoencoder import AutoencoderConfig, ldm_kl16_config

    if section.preset == "ldm-kl16":
        return ldm_kl16_config()
    if not section.channel_mult or min(section.channel_mult) < 1:
        raise RecipeError(f"recipe key 'model.channel_mult': {section.channel_mult} must list at least one positive multiplier, e.g. [1, 2, 2, 4].")
    config = AutoencoderConfig(
        channels=section.channels, channel_mult=list(section.channel_mult), num_res_blocks=section.num_res_blocks,
        attn_resolutions=list(section.attn_resolutions), z_channels=section.embed_dim, embed_dim=section.embed_dim,
        norm_groups=section.norm_groups, resolution=resolution,
    )
    try:
        config.validate()
    except ValueError as exc:
        raise RecipeError(f"recipe section 'model': {exc}.") from exc
    return config


class RandomCrops(Dataset):
    """Random square crops of preloaded photos, resized to ``resolution`` in [-1, 1]."""

    def __init__(self, photos: list[torch.Tensor], resolution: int, crop_scale_min: float, length: int) -> None:
        self.photos = photos
        self.resolution = resolution
        self.crop_scale_min = crop_scale_min
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        from mmtk.mmar.data import square_image

        photo = self.photos[random.randrange(len(self.photos))]
        height, width = photo.shape[-2:]
        shorter = min(height, width)
        side = max(self.resolution // 2, int(round(shorter * random.uniform(self.crop_scale_min, 1.0))))
        side = min(side, shorter)
        top = random.randint(0, height - side)
        left = random.randint(0, width - side)
        crop = square_image(photo[:, top : top + side, left : left + side], self.resolution)
        return crop.flip(-1) if random.random() < 0.5 else crop


def load_photos(data: PhotoData) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Return (training photos, held-out photos) as (3, H, W) uint8 tensors, each at most 2x the resolution on its shorter side."""
    from mmtk.mmar.data import read_coco_mini, split_heldout
    from mmtk.nn.image import load_image, load_offline_photos, resize_shorter_side, to_float

    train_records, heldout_records = split_heldout(read_coco_mini(data.images), data.heldout_every)

    def shrink(image: torch.Tensor) -> torch.Tensor:
        if min(image.shape[-2:]) <= 2 * data.resolution:
            return image
        resized = resize_shorter_side(to_float(image[None]), 2 * data.resolution)[0]  # (3, H', W') in [0, 1]
        return (resized.clamp(0, 1) * 255).round().to(torch.uint8)

    train = [shrink(load_image(r.path)) for r in train_records]
    heldout = [shrink(load_image(r.path)) for r in heldout_records]
    if data.skimage_photos:
        for name, array in load_offline_photos().items():
            train.append(shrink(torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()))
    small = [i for i, photo in enumerate(train) if min(photo.shape[-2:]) < data.resolution // 2]
    if small:
        log.warning("%d training photos are smaller than half the crop size and are upsampled", len(small))
    return train, heldout


class AutoencoderTask(TrainingTask):
    """Reconstruction training of a :class:`KLAutoencoder`."""

    def __init__(self, recipe: AutoencoderRecipe, train_photos: list[torch.Tensor], heldout: torch.Tensor) -> None:
        self.recipe = recipe
        self.train_photos = train_photos
        self.heldout = heldout

    def build_model(self):
        from mmtk.nn.autoencoder import KLAutoencoder, load_autoencoder_weights

        model = KLAutoencoder(autoencoder_config(self.recipe.model, self.recipe.data.resolution))
        if self.recipe.model.weights is not None:
            load_autoencoder_weights(model, self.recipe.model.weights)
        return model

    def train_dataset(self) -> Dataset:
        data = self.recipe.data
        return RandomCrops(self.train_photos, data.resolution, data.crop_scale_min, data.samples_per_epoch)

    def training_step(self, model, batch: torch.Tensor) -> tuple[torch.Tensor, Mapping[str, Any]]:
        reconstruction, posterior = model(batch)
        l1 = (reconstruction.float() - batch).abs().mean()
        kl = posterior.kl().float().mean() / batch[0].numel()
        loss = l1 + self.recipe.loss.kl_weight * kl
        return loss, {"l1": l1.detach(), "kl_per_value": kl.detach()}

    def evaluate(self, model) -> Mapping[str, float] | None:
        if self.heldout.shape[0] == 0:
            return None
        device = next(model.parameters()).device
        images = self.heldout.to(device)
        reconstruction, _ = model(images, sample_posterior=False)
        mse = ((reconstruction.float().clamp(-1, 1) - images) ** 2).mean().item()
        # PSNR on the [0, 1] scale: pixel errors halve, squared errors quarter.
        psnr = 10 * math.log10(1.0 / max(mse / 4, 1e-12))
        return {"heldout_mse": mse, "heldout_psnr_db": psnr}


@torch.no_grad()
def estimate_scale_factor(model, images: torch.Tensor, batch_size: int = 32) -> float:
    """Return 1 / std of posterior samples of ``images``, so scaled latents have unit std."""
    samples = []
    for start in range(0, images.shape[0], batch_size):
        samples.append(model.encode(images[start : start + batch_size]).sample().flatten())
    std = torch.cat(samples).float().std().item()
    return 1.0 / max(std, 1e-8)


def run(context) -> dict[str, Any]:
    """Entry point of ``mmtk train-kl-autoencoder``."""
    from mmtk.core.checkpoint import save_checkpoint
    from mmtk.mmar.data import save_image_grid, square_image, to_uint8_images
    from mmtk.nn.autoencoder import autoencoder_checkpoint_state

    recipe: AutoencoderRecipe = context.recipe
    if recipe.threads > 0:
        torch.set_num_threads(recipe.threads)
    config = autoencoder_config(recipe.model, recipe.data.resolution)
    if recipe.data.resolution % config.downsample_factor:
        raise RecipeError(f"recipe key 'data.resolution': {recipe.data.resolution} px is not a multiple of the downsampling factor {config.downsample_factor}.")
    train_photos, heldout_photos = load_photos(recipe.data)
    if not train_photos:
        raise RecipeError(f"no training photos: data.heldout_every={recipe.data.heldout_every} holds out every photo of {recipe.data.images} and data.skimage_photos is off; raise heldout_every or set it to 0.")
    heldout = torch.stack([square_image(p, recipe.data.resolution) for p in heldout_photos]) if heldout_photos else torch.zeros(0, 3, recipe.data.resolution, recipe.data.resolution)
    task = AutoencoderTask(recipe, train_photos, heldout)
    trainer = Trainer(task, recipe.train, context.run, seed=recipe.seed, device=recipe.device, console=context.console)

    context.start()
    log.info("training the KL autoencoder on %d photos (%d held out)", len(train_photos), len(heldout_photos))
    result = trainer.fit()

    model = trainer.model
    model.eval()
    device = next(model.parameters()).device
    centre_crops = torch.stack([square_image(p, recipe.data.resolution) for p in train_photos]).to(device)
    model.scale_factor = estimate_scale_factor(model, centre_crops)
    output = context.run.file("autoencoder.pt")
    if context.run.writer:
        save_checkpoint(output, {"tool": TOOL, **autoencoder_checkpoint_state(model.cpu())})
    model.to(device)

    summary: dict[str, Any] = {"autoencoder": str(output), "scale_factor": model.scale_factor, "train": result,
                               "latent_shape": [config.embed_dim, recipe.data.resolution // config.downsample_factor, recipe.data.resolution // config.downsample_factor]}
    if heldout.shape[0] > 0 and context.run.writer:
        shown = heldout[:8].to(device)
        with torch.no_grad():
            reconstruction, _ = model(shown, sample_posterior=False)
        grid = torch.cat([shown, reconstruction.float().clamp(-1, 1)])
        summary["reconstructions"] = str(save_image_grid(context.run.file("reconstructions.png"), to_uint8_images(grid), columns=shown.shape[0]))
        summary["heldout_psnr_db"] = (result.get("eval") or {}).get("heldout_psnr_db")
    log.info("latent scale factor %.4f; autoencoder written to %s", model.scale_factor, output)
    return summary
