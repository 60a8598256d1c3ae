"""Gaussian diffusion: the cosine schedule, output parameterisations and samplers.

The forward process is ``x_t = alpha_t * x_0 + sigma_t * eps`` with
``alpha_t = sqrt(abar_t)`` and ``sigma_t = sqrt(1 - abar_t)`` over ``T``
discrete steps (default 1000). A denoiser predicts one of three targets:

- ``"eps"``: the noise ``eps``;
- ``"v"``: the velocity ``v = alpha_t * eps - sigma_t * x_0``;
- ``"x0"``: the clean sample ``x_0``.

:func:`to_x0_eps` converts any of them back to ``(x_0, eps)``. Sampling runs
on a respaced subset of the training timesteps, deterministically (DDIM,
``eta = 0``) or ancestrally (DDPM, ``eta = 1``), and works for any denoiser
``fn(x_t, t) -> output`` of the chosen parameterisation, so classifier-free
guidance and other wrappers live in the caller.

Schedule arithmetic runs in float64; the sampling state runs in the dtype of
the initial noise.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch

Parameterisation = Literal["eps", "v", "x0"]
PARAMETERISATIONS: tuple[str, ...] = ("eps", "v", "x0")

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cosine_alphas_cumprod(num_steps: int = 1000, offset: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Return ``abar_t`` for t = 0..num_steps-1 under the improved-DDPM cosine schedule, float64.

    ``f(s) = cos^2(((s / T) + offset) / (1 + offset) * pi / 2)``, each step's
    ``beta_t = min(1 - f(t + 1) / f(t), max_beta)`` and ``abar_t`` is the
    cumulative product of ``1 - beta``. With the defaults ``abar_999`` is
    about 2.43e-9, because the clip at 0.999 bounds the last steps.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    s = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((s + offset) / (1 + offset) * math.pi / 2) ** 2
    betas = torch.clamp(1 - f[1:] / f[:-1], max=max_beta)  # (T,)
    return torch.cumprod(1 - betas, dim=0)


def linear_alphas_cumprod(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Return ``abar_t`` for DDPM's linear beta schedule (scaled to 1000 steps), float64."""
    scale = 1000 / num_steps
    betas = torch.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def respaced_timesteps(num_sampling_steps: int, num_steps: int = 1000) -> torch.Tensor:
    """Return the K sampling timesteps ``round(i * (T - 1) / (K - 1))`` in descending order.

    Sampling therefore starts at ``t = T - 1`` and ends at ``t = 0``; for
    K = 25 and T = 1000 the first step goes 999 -> 957. K = 1 gives ``[T - 1]``.
    """
    if not 1 <= num_sampling_steps <= num_steps:
        raise ValueError(f"num_sampling_steps must be in [1, {num_steps}], got {num_sampling_steps}")
    if num_sampling_steps == 1:
        return torch.tensor([num_steps - 1], dtype=torch.long)
    i = torch.arange(num_sampling_steps, dtype=torch.float64)
    steps = torch.round(i * (num_steps - 1) / (num_sampling_steps - 1)).long()
    return steps.flip(0)


def check_parameterisation(parameterisation: str) -> None:
    """Raise ValueError unless ``parameterisation`` is one of eps, v, x0."""
    if parameterisation not in PARAMETERISATIONS:
        raise ValueError(f"unknown parameterisation {parameterisation!r}; expected one of {', '.join(PARAMETERISATIONS)}")


def to_x0_eps(x_t: torch.Tensor, output: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, parameterisation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert a denoiser output to the implied ``(x_0, eps)``.

    ``alpha`` and ``sigma`` broadcast against ``x_t``. For ``"v"`` the
    conversion is a rotation, ``x_0 = alpha x_t - sigma v`` and
    ``eps = sigma x_t + alpha v``, so it never divides; ``"eps"`` divides by
    ``alpha`` and ``"x0"`` by ``sigma``.
    """
    check_parameterisation(parameterisation)
    if parameterisation == "eps":
        eps = output
        x0 = (x_t - sigma * eps) / alpha
    elif parameterisation == "v":
        x0 = alpha * x_t - sigma * output
        eps = sigma * x_t + alpha * output
    else:
        x0 = output
        eps = (x_t - alpha * x0) / sigma
    return x0, eps


def from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, parameterisation: str) -> torch.Tensor:
    """Return the target of ``parameterisation`` for a given ``(x_0, eps)`` pair."""
    check_parameterisation(parameterisation)
    if parameterisation == "eps":
        return eps
    if parameterisation == "v":
        return alpha * eps - sigma * x0
    return x0


def error_amplification(alpha: float, sigma: float, alpha_next: float, sigma_next: float, parameterisation: str) -> float:
    """Return how much one DDIM step from (alpha, sigma) to the next multiplies an output error.

    An error ``e`` in the denoiser output moves the next state by
    ``(sigma_next * alpha - alpha_next * sigma) * e / delta``, where
    ``delta`` is the determinant of the map from ``(x_0, eps)`` to the
    output: ``alpha`` for eps, 1 for v and ``-sigma`` for x0. Returns the
    absolute factor.
    """
    check_parameterisation(parameterisation)
    delta = {"eps": alpha, "v": alpha * alpha + sigma * sigma, "x0": -sigma}[parameterisation]
    return abs((sigma_next * alpha - alpha_next * sigma) / delta)


class GaussianDiffusion:
    """A discrete-time Gaussian diffusion with one output parameterisation.

    Args:
        num_steps: training timesteps T (default 1000).
        parameterisation: what the denoiser predicts: "v" (default), "eps" or "x0".
        schedule: "cosine" (improved DDPM, default) or "linear" (DDPM).
    """

    def __init__(self, num_steps: int = 1000, parameterisation: str = "v", schedule: str = "cosine") -> None:
        check_parameterisation(parameterisation)
        if schedule == "cosine":
            alphas_cumprod = cosine_alphas_cumprod(num_steps)
        elif schedule == "linear":
            alphas_cumprod = linear_alphas_cumprod(num_steps)
        else:
            raise ValueError(f"unknown schedule {schedule!r}; expected cosine or linear")
        self.num_steps = num_steps
        self.parameterisation = parameterisation
        self.schedule = schedule
        self.alphas_cumprod = alphas_cumprod  # (T,) float64

    # ------------------------------------------------------------ training

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``alpha_t`` and ``sigma_t`` shaped (N, 1, ..., 1) to broadcast against ``like`` (N, ...)."""
        abar = self.alphas_cumprod.to(t.device)[t]  # (N,)
        shape = (-1,) + (1,) * (like.dim() - 1)
        alpha = abar.sqrt().to(like.dtype).view(shape)
        sigma = (1 - abar).sqrt().to(like.dtype).view(shape)
        return alpha, sigma

    def sample_timesteps(self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` training timesteps uniformly from {0, ..., T-1}."""
        return torch.randint(0, self.num_steps, (n,), device=device, generator=generator)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Return ``x_t = alpha_t x_0 + sigma_t eps``."""
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Return the regression target of this parameterisation at timesteps ``t``."""
        alpha, sigma = self.alpha_sigma(t, x0)
        return from_x0_eps(x0, noise, alpha, sigma, self.parameterisation)

    def training_loss(self, denoiser: Denoiser, x0: torch.Tensor, t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Return the per-sample mean squared error of ``denoiser`` against its target, shape (N,)."""
        if t is None:
            t = self.sample_timesteps(x0.shape[0], x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        output = denoiser(x_t, t)
        target = self.training_target(x0, noise, t)
        return ((output.float() - target.float()) ** 2).flatten(1).mean(dim=1)

    # ------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(
        self,
        denoiser: Denoiser,
        noise: torch.Tensor,
        num_sampling_steps: int = 100,
        eta: float = 0.0,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        clip_x0: float | None = None,
    ) -> torch.Tensor:
        """Run the reverse process from ``noise`` (the state at t = T-1) to a clean sample.

        Args:
            denoiser: ``fn(x_t, t) -> output`` with ``t`` a (N,) long tensor of
                training timesteps; returns this diffusion's parameterisation.
            noise: initial state (N, ...); its dtype is the state's dtype.
            num_sampling_steps: K respaced steps (see :func:`respaced_timesteps`).
            eta: 0 for deterministic DDIM, 1 for ancestral DDPM on the respaced
                schedule, values between interpolate.
            temperature: multiplies the std of the noise injected at each step
                (no effect when ``eta`` is 0).
            clip_x0: clamp the predicted ``x_0`` to [-clip_x0, clip_x0] when set.

        Returns:
            The sample, same shape and dtype as ``noise``.
        """
        x = noise
        timesteps = respaced_timesteps(num_sampling_steps, self.num_steps).tolist()
        n = x.shape[0]
        for index, t in enumerate(timesteps):
            t_prev = timesteps[index + 1] if index + 1 < len(timesteps) else None
            abar = float(self.alphas_cumprod[t])
            abar_prev = float(self.alphas_cumprod[t_prev]) if t_prev is not None else 1.0

            t_batch = torch.full((n,), t, dtype=torch.long, device=x.device)
            output = denoiser(x, t_batch).to(x.dtype)
            x0, eps = to_x0_eps(x, output, math.sqrt(abar), math.sqrt(1 - abar), self.parameterisation)
            if clip_x0 is not None:
                x0 = x0.clamp(-clip_x0, clip_x0)
                eps = (x - math.sqrt(abar) * x0) / math.sqrt(1 - abar)

            # Posterior std of q(x_prev | x_t, x_0) on the respaced chain, scaled by eta.
            variance = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev) if t_prev is not None else 0.0
            std = eta * math.sqrt(max(variance, 0.0))
            x = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - std * std, 0.0)) * eps  # (N, ...)
            if std > 0:
                z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                x = x + temperature * std * z
        return x
