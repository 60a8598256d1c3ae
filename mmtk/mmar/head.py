"""The per-token diffusion head: an adaLN residual MLP that models p(token | hidden state).

Each image token ``x`` (dimension D) gets its own small denoiser, conditioned
on the backbone's hidden state ``z`` at that token's position. The head sees
no other token, so all tokens and all noise draws form one flat batch.

With ``learn_sigma`` the head outputs 2 D values, as MAR's does: the
prediction (eps, v or x0) and a variance value per dimension, trained with
improved DDPM's hybrid loss (see :class:`mmtk.nn.diffusion.GaussianDiffusion`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmtk.core.logging import get_logger
from mmtk.nn.diffusion import GaussianDiffusion

log = get_logger(__name__)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Apply the adaLN affine map ``x * (1 + scale) + shift``."""
    return x * (1 + scale) + shift


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Embed timesteps (N,) as ``[cos(t w_k), sin(t w_k)]`` with ``w_k = max_period^(-k / (dim / 2))``; returns (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)  # (dim/2,)
    angles = t.float()[:, None] * freqs[None]  # (N, dim/2)
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (N, 2*(dim/2))
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features followed by Linear -> SiLU -> Linear."""

    def __init__(self, width: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_dim).to(self.mlp[0].weight.dtype))  # (N, W)


class AdaLNResBlock(nn.Module):
    """LayerNorm -> modulate -> Linear -> SiLU -> Linear, gated and added to the residual."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)  # 3 x (N, W)
        h = self.mlp(modulate(self.norm(x), shift, scale))
        return x + gate * h


class FinalLayer(nn.Module):
    """Non-affine LayerNorm modulated by the condition, then a Linear map to the token dimension."""

    def __init__(self, width: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiffusionHead(nn.Module):
    """The adaLN MLP denoiser ``f(x_t, t, z)`` for one token.

    Args:
        token_dim: D, the size of one image token.
        cond_dim: size of the conditioning hidden state z.
        width: W, the MLP width (MAR default 1024; CPU recipes 128-256).
        depth: number of residual blocks (MAR default 3).
        learn_sigma: also output a variance value per token dimension, so the
            output has 2 D values (MAR's head); default False (D values).

    Every adaLN output layer and the final Linear start at zero, so the
    head outputs exactly 0 until it is trained (both halves with
    ``learn_sigma``; a zero variance value means the geometric mean of
    ``beta_t`` and ``beta_tilde_t``).
    """

    def __init__(self, token_dim: int, cond_dim: int, width: int = 1024, depth: int = 3, learn_sigma: bool = False) -> None:
        super().__init__()
        self.token_dim = token_dim
        self.learn_sigma = learn_sigma
        self.out_dim = 2 * token_dim if learn_sigma else token_dim
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.blocks = nn.ModuleList([AdaLNResBlock(width) for _ in range(depth)])
        self.final_layer = FinalLayer(width, self.out_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform Linear weights, std 0.02 for the time MLP, zeros for adaLN outputs and the output layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Denoise a flat batch: x_t (N, D), t (N,) long, z (N, cond_dim) -> output (N, D), or (N, 2D) with ``learn_sigma``."""
        y = self.time_embed(t) + self.cond_embed(z)  # (N, W)
        h = self.input_proj(x_t)  # (N, W)
        for block in self.blocks:
            h = block(h, y)
        return self.final_layer(h, y)  # (N, out_dim)


class DiffusionLoss(nn.Module):
    """The head with its diffusion process: training loss and sampling for a set of tokens.

    Args:
        token_dim, cond_dim, width, depth: see :class:`DiffusionHead`.
        parameterisation: "v" (default), "eps" or "x0".
        num_steps: training timesteps T (default 1000, cosine schedule).
        batch_mul: independent (t, noise) draws per token per training step
            (MAR's ``diffusion_batch_mul``, default 4).
        learn_sigma: learn the reverse-step variance (MAR does, with eps);
            the loss then adds the variational-bound term. Default False.
        vlb_weight: lambda of the hybrid loss (default 0.001, improved DDPM's).
    """

    def __init__(
        self, token_dim: int, cond_dim: int, width: int = 1024, depth: int = 3, parameterisation: str = "v", num_steps: int = 1000, batch_mul: int = 4,
        learn_sigma: bool = False, vlb_weight: float = 0.001,
    ) -> None:
        super().__init__()
        self.head = DiffusionHead(token_dim, cond_dim, width, depth, learn_sigma=learn_sigma)
        self.diffusion = GaussianDiffusion(num_steps, parameterisation, learn_sigma=learn_sigma, vlb_weight=vlb_weight)
        self.batch_mul = batch_mul
        log.debug("diffusion head: token_dim %d, width %d, depth %d, pred %s, learn_sigma %s", token_dim, width, depth, parameterisation, learn_sigma)

    def forward(self, tokens: torch.Tensor, z: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Return the mean diffusion loss over tokens (N, D) conditioned on z (N, C).

        ``weight`` (N,) selects or weights tokens (1 for masked tokens, 0
        otherwise); the loss is the weighted mean, and 0 when all weights are 0.
        """
        tokens = tokens.repeat(self.batch_mul, 1)  # (N*m, D)
        z = z.repeat(self.batch_mul, 1)  # (N*m, C)
        t = self.diffusion.sample_timesteps(tokens.shape[0], tokens.device)
        per_token = self.diffusion.training_loss(lambda x_t, tt: self.head(x_t, tt, z), tokens, t)  # (N*m,)
        if weight is None:
            return per_token.mean()
        weight = weight.to(per_token.dtype).repeat(self.batch_mul)
        return (per_token * weight).sum() / weight.sum().clamp(min=1e-8)

    @torch.no_grad()
    def sample(
        self,
        z: torch.Tensor,
        z_uncond: torch.Tensor | None = None,
        cfg_scale: float = 1.0,
        num_sampling_steps: int = 100,
        temperature: float = 1.0,
        eta: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample one token per condition row: z (N, C) -> tokens (N, D).

        With ``z_uncond`` and ``cfg_scale`` != 1, each step evaluates the head
        on both conditions with the same ``x_t`` and uses
        ``out_u + cfg_scale * (out_c - out_u)`` for the prediction; a learned
        variance comes from the conditional half alone, as in MAR. ``eta`` = 1
        samples ancestrally (DDPM, the MAR default, with the learned variance
        when the head has one), 0 deterministically (DDIM).
        """
        n = z.shape[0]
        noise = torch.randn((n, self.head.token_dim), generator=generator, device=z.device, dtype=z.dtype)
        guided = z_uncond is not None and cfg_scale != 1.0

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if not guided:
                return self.head(x_t, t, z)
            both = self.head(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([z, z_uncond]))  # (2N, out_dim)
            cond, uncond = both.chunk(2)  # 2 x (N, out_dim)
            d = self.head.token_dim
            guided_prediction = uncond[:, :d] + cfg_scale * (cond[:, :d] - uncond[:, :d])  # (N, D)
            return torch.cat([guided_prediction, cond[:, d:]], dim=1)  # (N, out_dim)

        return self.diffusion.sample(denoise, noise, num_sampling_steps, eta=eta, temperature=temperature, generator=generator)
