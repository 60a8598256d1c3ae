"""Image tokens: latent-patch grouping, MAR-style random masking and the unmasking schedule."""

from __future__ import annotations

import math

import torch


def patchify(latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Group p x p latent patches into tokens: (B, C, h, w) -> (B, (h/p)(w/p), C p p), row-major."""
    b, c, h, w = latents.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"latent size {h}x{w} is not a multiple of the patch size {p}")
    x = latents.reshape(b, c, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, h/p, w/p, C, p, p)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, patch_size: int, channels: int, height: int, width: int) -> torch.Tensor:
    """Invert :func:`patchify`: (B, N, C p p) -> (B, C, height, width) with height, width in latent pixels."""
    b = tokens.shape[0]
    p = patch_size
    x = tokens.reshape(b, height // p, width // p, channels, p, p)
    x = x.permute(0, 3, 1, 4, 2, 5)  # (B, C, h/p, p, w/p, p)
    return x.reshape(b, channels, height, width)


def sample_mask_ratios(n: int, low: float, high: float, distribution: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``n`` mask ratios in [low, high].

    ``"truncnorm"`` is a normal with mean 1.0 and std 0.25 truncated to
    [low, high], MAR's ratio distribution. With [0.7, 1] it gives the first
    MMAR stage. ``"uniform"`` is uniform on [low, high], and with [0, 1] it
    gives the second stage.
    """
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"mask ratio range must satisfy 0 <= low <= high <= 1, got [{low}, {high}]")
    if distribution == "uniform":
        return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)
    if distribution == "truncnorm":
        # Inverse-CDF sampling of N(1, 0.25^2) restricted to [low, high].
        normal = torch.distributions.Normal(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.25, dtype=torch.float64))
        cdf_low, cdf_high = normal.cdf(torch.tensor(low, dtype=torch.float64)), normal.cdf(torch.tensor(high, dtype=torch.float64))
        u = cdf_low + (cdf_high - cdf_low) * torch.rand(n, generator=generator, dtype=torch.float64)
        return normal.icdf(u.clamp(1e-12, 1 - 1e-12)).clamp(low, high)
    raise ValueError(f"unknown mask ratio distribution {distribution!r}; expected truncnorm or uniform")


def random_orders(batch: int, num_tokens: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Return one random permutation of the token indices per image: (B, N) long."""
    return torch.argsort(torch.rand(batch, num_tokens, generator=generator), dim=1)


def mask_by_order(num_masked: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """Mask the first ``num_masked[b]`` tokens of each image's order: returns (B, N) bool, True = masked."""
    batch, num_tokens = orders.shape
    rank = torch.empty_like(orders)
    rank.scatter_(1, orders, torch.arange(num_tokens, device=orders.device).expand(batch, num_tokens))  # rank[b, token]
    return rank < num_masked.view(-1, 1)


def random_masks(ratios: torch.Tensor, num_tokens: int, generator: torch.Generator | None = None, min_masked: int = 0) -> torch.Tensor:
    """Mask ``ceil(ratio * N)`` random tokens per image, at least ``min_masked``: (B, N) bool."""
    num_masked = torch.ceil(ratios * num_tokens).long().clamp(min=min_masked, max=num_tokens)
    orders = random_orders(ratios.shape[0], num_tokens, generator)
    return mask_by_order(num_masked, orders)


def masked_counts(num_tokens: int, num_iterations: int) -> list[int]:
    """Return how many tokens stay masked after each generation iteration.

    Follows the cosine schedule ``floor(N cos(pi/2 (k+1)/K))`` but reveals at
    least one token per iteration and ends at 0, so the list strictly
    decreases from at most N-1 to 0 (length K). Needs K <= N.
    """
    if not 1 <= num_iterations <= num_tokens:
        raise ValueError(f"the number of iterations must be in [1, {num_tokens}] (one token at least per iteration), got {num_iterations}")
    counts = []
    remaining = num_tokens
    for k in range(num_iterations):
        target = int(math.floor(num_tokens * math.cos(math.pi / 2 * (k + 1) / num_iterations)))
        iterations_left = num_iterations - k - 1
        # Keep at least one token per later iteration, and reveal at least one now.
        target = max(target, iterations_left)
        target = min(target, remaining - 1)
        counts.append(target)
        remaining = target
    return counts


# ------------------------------------------------------------ pixel tokens


class PixelConfig:
    """The fields of an autoencoder config that the MMAR pipeline reads, for raw pixels."""

    downsample_factor = 1
    embed_dim = 3
    in_channels = 3


class PixelTokenizer(torch.nn.Module):
    """Raw pixels as "latents", so that p x p x 3 pixel patches become tokens.

    It offers the interface of :class:`mmtk.nn.autoencoder.KLAutoencoder`
    that the pipeline uses: ``encode`` returns a posterior whose mean is the
    image (B, 3, R, R) in [-1, 1] and whose variance is negligible,
    ``decode`` returns its input, and ``scale_factor`` multiplies the pixels
    to about unit std (estimate it with 1 / std of the training pixels).
    """

    def __init__(self, scale_factor: float = 0.0) -> None:
        super().__init__()
        self.config = PixelConfig()
        self.scale_factor = scale_factor

    def encode(self, images: torch.Tensor):
        from mmtk.nn.autoencoder import DiagonalGaussian

        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        logvar = torch.full_like(images, -30.0)  # the smallest log-variance DiagonalGaussian keeps
        return DiagonalGaussian(torch.cat([images, logvar], dim=1))  # moments (B, 6, R, R)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


def image_tokenizer_state(model) -> dict:
    """Return the ``model.pt`` entry of the image tokenizer: a KL autoencoder's checkpoint state or ``{"kind": "pixels", ...}``."""
    if isinstance(model, PixelTokenizer):
        return {"kind": "pixels", "scale_factor": float(model.scale_factor)}
    from mmtk.nn.autoencoder import autoencoder_checkpoint_state

    return autoencoder_checkpoint_state(model)


def image_tokenizer_from_state(state: dict):
    """Rebuild the image tokenizer from :func:`image_tokenizer_state` output."""
    if state.get("kind") == "pixels":
        return PixelTokenizer(float(state["scale_factor"]))
    from mmtk.nn.autoencoder import autoencoder_from_checkpoint_state

    return autoencoder_from_checkpoint_state(state)
