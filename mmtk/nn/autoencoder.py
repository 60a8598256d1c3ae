"""KL-regularised convolutional autoencoder (the latent-diffusion "AutoencoderKL").

The module and parameter names follow the LDM code base
(``encoder.down.0.block.0.norm1.weight``, ``quant_conv``, ...), so LDM and
MAR checkpoints of this architecture load without renaming. Two presets:

- :func:`ldm_kl16_config`: the LDM KL-16 model MAR and MMAR use: 256 px in,
  16x16x16 latents out (downsampling 16), 69.6M parameters;
- :func:`small_kl_config`: a CPU-sized model that mmtk trains itself
  (``mmtk train-kl-autoencoder``), 64 px in, 8x8x4 latents out.

Images are float tensors in [-1, 1], shape (B, 3, H, W), with H and W
multiples of the downsampling factor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmtk.core.checkpoint import state_dict_mismatch
from mmtk.core.errors import InputError
from mmtk.core.logging import get_logger

log = get_logger(__name__)


@dataclass
class AutoencoderConfig:
    """Architecture of a :class:`KLAutoencoder`.

    Attributes:
        channels: base channel count ``ch`` (LDM KL-16: 128).
        channel_mult: per-resolution channel multipliers; each level after
            the first halves the resolution, so the downsampling factor is
            ``2 ** (len(channel_mult) - 1)``.
        num_res_blocks: residual blocks per level in the encoder (the decoder
            uses one more).
        attn_resolutions: feature-map sizes (px) that get a self-attention block.
        z_channels: channels of the encoder output before ``quant_conv``.
        embed_dim: latent channels C.
        norm_groups: GroupNorm groups (LDM: 32); must divide every channel count.
        resolution: nominal input size in px (only decides where attention sits).
    """

    channels: int = 128
    channel_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    z_channels: int = 16
    embed_dim: int = 16
    norm_groups: int = 32
    resolution: int = 256
    in_channels: int = 3
    dropout: float = 0.0

    @property
    def downsample_factor(self) -> int:
        """Ratio between image size and latent size."""
        return 2 ** (len(self.channel_mult) - 1)

    def validate(self) -> None:
        """Raise ValueError if the GroupNorm groups do not divide every channel count."""
        for mult in self.channel_mult:
            if (self.channels * mult) % self.norm_groups:
                raise ValueError(f"norm_groups {self.norm_groups} does not divide {self.channels * mult} channels; choose channels and norm_groups so that it does")


def ldm_kl16_config() -> AutoencoderConfig:
    """Return the LDM KL-16 architecture (the tokenizer of MAR): 256 px -> 16x16x16."""
    return AutoencoderConfig()


def small_kl_config() -> AutoencoderConfig:
    """Return a small CPU-trainable architecture: 64 px -> 8x8x4, 0.76M parameters."""
    return AutoencoderConfig(channels=16, channel_mult=[1, 2, 2, 4], num_res_blocks=1, attn_resolutions=[], z_channels=4, embed_dim=4, norm_groups=8, resolution=64)


# ------------------------------------------------------------------ blocks


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus a 1x1 shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv projections."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x_norm = self.norm(x)
        q = self.q(x_norm).flatten(2).transpose(1, 2)  # (B, HW, C)
        k = self.k(x_norm).flatten(2).transpose(1, 2)
        v = self.v(x_norm).flatten(2).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        attended = attended.transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(attended)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution after padding one pixel on the right and bottom."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> mean and log-variance moments (B, 2*z_channels, H/f, W/f)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        ch, groups = config.channels, config.norm_groups
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        in_mult = [1] + list(config.channel_mult)
        resolution = config.resolution
        block_in = ch
        for level, mult in enumerate(config.channel_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            block_in = ch * in_mult[level]
            block_out = ch * mult
            for _ in range(config.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, groups, config.dropout))
                block_in = block_out
                if resolution in config.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, groups))
            if level != len(config.channel_mult) - 1:
                stage.downsample = Downsample(block_in)
                resolution //= 2
            self.down.append(stage)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, groups, config.dropout)
        self.mid.attn_1 = AttnBlock(block_in, groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, groups, config.dropout)
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, 2 * config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for index, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[index](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)  # (B, C, H/2, W/2)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, 3, h*f, w*f)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        ch, groups = config.channels, config.norm_groups
        levels = len(config.channel_mult)
        block_in = ch * config.channel_mult[-1]
        resolution = config.resolution // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(config.z_channels, block_in, 3, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, groups, config.dropout)
        self.mid.attn_1 = AttnBlock(block_in, groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, groups, config.dropout)

        # Built from the lowest resolution up, stored in resolution order (up[0] is full size).
        stages: list[nn.Module] = []
        for level in reversed(range(levels)):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            block_out = ch * config.channel_mult[level]
            for _ in range(config.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out, groups, config.dropout))
                block_in = block_out
                if resolution in config.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, groups))
            if level != 0:
                stage.upsample = Upsample(block_in)
                resolution *= 2
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)

        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, config.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for stage in reversed(self.up):
            for index, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[index](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)  # (B, C, 2h, 2w)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)), per latent element."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + self.std * noise

    def kl(self) -> torch.Tensor:
        """KL divergence to N(0, I), summed over latent elements: shape (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(dim=1)


class KLAutoencoder(nn.Module):
    """Encoder, decoder and the 1x1 ``quant_conv``/``post_quant_conv`` around the latent.

    ``scale_factor`` multiplies latents so that they have about unit std for
    the model that consumes them (MAR uses 0.2325 for LDM KL-16). A trained
    mmtk autoencoder stores its own estimate.
    """

    def __init__(self, config: AutoencoderConfig, scale_factor: float = 1.0) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.scale_factor = scale_factor
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def check_image_size(self, images: torch.Tensor) -> None:
        """Raise ValueError unless ``images`` is (B, 3, H, W) with H and W multiples of the downsampling factor."""
        factor = self.config.downsample_factor
        if images.dim() != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images of shape (B, {self.config.in_channels}, H, W), got {tuple(images.shape)}")
        if images.shape[2] % factor or images.shape[3] % factor:
            raise ValueError(f"image size {images.shape[2]}x{images.shape[3]} px is not a multiple of the downsampling factor {factor}")

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """Return the posterior over unscaled latents for images (B, 3, H, W) in [-1, 1]."""
        self.check_image_size(images)
        return DiagonalGaussian(self.quant_conv(self.encoder(images)))  # moments (B, 2C, H/f, W/f)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode unscaled latents (B, C, h, w) to images (B, 3, h*f, w*f), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(latents))

    def forward(self, images: torch.Tensor, sample_posterior: bool = True) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(images)
        latents = posterior.sample() if sample_posterior else posterior.mean
        return self.decode(latents), posterior


# ------------------------------------------------------------------ weights


def extract_state_dict(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Return the autoencoder tensors of a checkpoint mapping.

    Accepts a bare state dict, MAR's ``{"model": ...}``, LDM's
    ``{"state_dict": ...}`` (its ``loss.*`` discriminator and LPIPS entries
    are dropped) and mmtk's ``{"autoencoder": ...}``.
    """
    for key in ("autoencoder", "model", "state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    prefixes = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and k.startswith(prefixes)}


def load_autoencoder_weights(model: KLAutoencoder, path: str | Path) -> KLAutoencoder:
    """Load local weights (``.safetensors``, or a torch checkpoint read with ``weights_only=True``) into ``model``.

    Raises InputError when the file is missing or unreadable, or when its
    tensors do not match the architecture (the message lists the first
    missing, unexpected or mis-shaped names).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"autoencoder weights not found: {path}. Give a local .ckpt, .pt or .safetensors file.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: dict[str, Any] = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means an unusable file
        raise InputError(f"cannot read autoencoder weights {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise InputError(f"autoencoder weights {path} do not contain a mapping of tensors.")

    tensors = extract_state_dict(state)
    mismatch = state_dict_mismatch(model.state_dict(), tensors)
    if mismatch is not None:
        raise InputError(f"autoencoder weights {path} do not match the configured architecture: {mismatch}. Check the autoencoder preset.")
    model.load_state_dict(tensors)
    log.info("loaded autoencoder weights from %s (%d tensors)", path, len(tensors))
    return model


def autoencoder_checkpoint_state(model: KLAutoencoder) -> dict[str, Any]:
    """Return a checkpoint mapping holding the weights, the config and the latent scale factor."""
    return {"autoencoder": model.state_dict(), "config": asdict(model.config), "scale_factor": float(model.scale_factor)}


def autoencoder_from_checkpoint_state(state: dict[str, Any]) -> KLAutoencoder:
    """Rebuild a :class:`KLAutoencoder` from :func:`autoencoder_checkpoint_state` output."""
    try:
        config = AutoencoderConfig(**state["config"])
        model = KLAutoencoder(config, scale_factor=float(state["scale_factor"]))
        model.load_state_dict(state["autoencoder"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"autoencoder checkpoint is incomplete or does not match its config: {exc}") from exc
    return model
