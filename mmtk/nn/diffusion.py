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

With ``learn_sigma`` the denoiser returns twice the channels (dim 1): the
prediction, then a value ``v`` in [-1, 1] per channel that sets the variance
of each reverse step (improved DDPM's learned range, see
:func:`interpolated_log_variance`). Training adds the variational-bound term
that fits ``v``; ancestral sampling (``eta = 1``) uses the learned variance and
DDIM ignores it.

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


def interpolated_log_variance(v: torch.Tensor, log_beta_tilde: torch.Tensor | float, log_beta: torch.Tensor | float) -> torch.Tensor:
    """Map a variance output ``v`` in [-1, 1] to a log variance between the two natural bounds.

    Improved DDPM (Nichol and Dhariwal, 2021) notes that the reverse-step
    variance of a diffusion lies between the posterior variance
    ``beta_tilde_t`` (the value for a point mass as data) and ``beta_t`` (for
    unit-variance Gaussian data). The network therefore predicts only where
    in that range to sit, in log space: ``f = (v + 1) / 2`` and
    ``log var = f log beta_t + (1 - f) log beta_tilde_t``. ``v = -1`` gives
    ``beta_tilde_t``, ``v = 1`` gives ``beta_t`` and an untrained (zero)
    output their geometric mean. ``v`` is not clamped.
    """
    fraction = (v + 1) / 2
    return fraction * log_beta + (1 - fraction) * log_beta_tilde


def normal_kl(mean_1: torch.Tensor, log_var_1: torch.Tensor, mean_2: torch.Tensor, log_var_2: torch.Tensor) -> torch.Tensor:
    """Return ``KL(N(mean_1, exp(log_var_1)) || N(mean_2, exp(log_var_2)))`` elementwise, in nats."""
    return 0.5 * (log_var_2 - log_var_1 + torch.exp(log_var_1 - log_var_2) + (mean_1 - mean_2) ** 2 * torch.exp(-log_var_2) - 1)


def discretised_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor, bin_width: float = 2 / 255, edge: float = 0.999) -> torch.Tensor:
    """Return the log probability (nats) of the bin around each ``x`` under ``N(mean, exp(log_std)^2)``, elementwise.

    The bins are those of 8-bit data scaled to [-1, 1] (width ``2 / 255``),
    as in DDPM's decoder term: a value below ``-edge`` takes the whole lower
    tail ``P(X <= x + w / 2)``, one above ``edge`` the whole upper tail
    ``P(X > x - w / 2)``, any other ``P(x - w / 2 < X <= x + w / 2)``. The
    normal CDF is exact (``torch.special.ndtr``), not the tanh approximation
    of the original code, so values agree with it to about 1e-3.
    """
    inv_std = torch.exp(-log_std)
    upper = (x - mean + bin_width / 2) * inv_std  # standardised bin edges
    lower = (x - mean - bin_width / 2) * inv_std
    log_below_upper = torch.special.log_ndtr(upper)
    log_above_lower = torch.special.log_ndtr(-lower)
    log_bin = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -edge, log_below_upper, torch.where(x > edge, log_above_lower, log_bin))


class GaussianDiffusion:
    """A discrete-time Gaussian diffusion with one output parameterisation.

    Args:
        num_steps: training timesteps T (default 1000).
        parameterisation: what the denoiser predicts: "v" (default), "eps" or "x0".
        schedule: "cosine" (improved DDPM, default) or "linear" (DDPM).
        learn_sigma: the denoiser also returns a variance output ``v`` per
            channel (its output has twice the channels along dim 1); default False.
        vlb_weight: lambda of improved DDPM's hybrid loss
            ``L_simple + lambda * L_vlb`` (default 0.001, the paper's value).
            One training timestep estimates ``L_vlb`` as T times that step's
            term, so each sample adds ``lambda * T`` times its term: 1 for
            T = 1000, which is the weight MAR's training code applies.
    """

    def __init__(self, num_steps: int = 1000, parameterisation: str = "v", schedule: str = "cosine", learn_sigma: bool = False, vlb_weight: float = 0.001) -> None:
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
        self.learn_sigma = learn_sigma
        self.vlb_weight = vlb_weight
        self.alphas_cumprod = alphas_cumprod  # (T,) float64

        # One-step quantities of the full chain, float64, indexed by t.
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        self.betas = 1 - alphas_cumprod / alphas_cumprod_prev  # (T,)
        self.posterior_variance = self.betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)  # beta_tilde_t, 0 at t = 0
        # log beta_tilde with the t = 0 value (log 0) replaced by t = 1's.
        self.posterior_log_variance = torch.log(torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])) if num_steps > 1 else torch.log(self.betas)
        self.posterior_mean_coef_x0 = self.betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod)
        self.posterior_mean_coef_xt = (1 - self.betas).sqrt() * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)

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

    def _at(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Return ``table[t]`` (N,) shaped (N, 1, ..., 1) in the dtype and device of ``like``."""
        return table.to(t.device)[t].to(like.dtype).view((-1,) + (1,) * (like.dim() - 1))

    def vlb_term(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor, variance_output: torch.Tensor) -> torch.Tensor:
        """Return each sample's term of the variational bound, in bits per dimension, shape (N,).

        The model's reverse step is ``N(mu, var)``: ``mu`` is the posterior
        mean of ``q(x_{t-1} | x_t, x0_hat)`` with ``x0_hat`` derived from
        ``output`` (any parameterisation), ``var`` comes from
        ``variance_output`` through :func:`interpolated_log_variance`. For
        t > 0 the term is ``KL(q(x_{t-1} | x_t, x_0) || N(mu, var))``, for t = 0
        the negative log likelihood of ``x_0`` under ``N(mu, var)`` in 8-bit
        bins (:func:`discretised_gaussian_log_likelihood`). Both are averaged
        over the non-batch dimensions and divided by ln 2.
        """
        dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
        x0, x_t, output, variance_output = (v.to(dtype) for v in (x0, x_t, output, variance_output))
        alpha, sigma = self.alpha_sigma(t, x0)
        x0_hat, _ = to_x0_eps(x_t, output, alpha, sigma, self.parameterisation)

        coef_x0 = self._at(self.posterior_mean_coef_x0, t, x0)
        coef_xt = self._at(self.posterior_mean_coef_xt, t, x0)
        true_mean = coef_x0 * x0 + coef_xt * x_t
        true_log_var = self._at(self.posterior_log_variance, t, x0)
        model_mean = coef_x0 * x0_hat + coef_xt * x_t
        model_log_var = interpolated_log_variance(variance_output, true_log_var, self._at(torch.log(self.betas), t, x0))

        kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var).flatten(1).mean(dim=1) / math.log(2)  # (N,)
        nll = -discretised_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).flatten(1).mean(dim=1) / math.log(2)  # (N,)
        return torch.where(t == 0, nll, kl)

    def training_terms(self, denoiser: Denoiser, x0: torch.Tensor, t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Return the per-sample losses, each shape (N,): ``mse``, and with ``learn_sigma`` ``vlb`` and their sum ``loss``.

        ``mse`` is the mean squared error of the prediction against this
        parameterisation's target. With ``learn_sigma``, ``vlb`` is
        :meth:`vlb_term` evaluated on a detached copy of the prediction, so
        the bound trains only the variance output and the mean is fitted by
        the squared error alone (improved DDPM's stop-gradient);
        ``loss = mse + vlb_weight * T * vlb``.
        """
        if t is None:
            t = self.sample_timesteps(x0.shape[0], x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        output = denoiser(x_t, t)
        variance_output = None
        if self.learn_sigma:
            output, variance_output = output.chunk(2, dim=1)  # 2 x (N, C, ...)
        target = self.training_target(x0, noise, t)
        terms = {"mse": ((output.float() - target.float()) ** 2).flatten(1).mean(dim=1)}
        if variance_output is None:
            terms["loss"] = terms["mse"]
            return terms
        terms["vlb"] = self.vlb_term(x0, x_t, t, output.detach(), variance_output)
        terms["loss"] = terms["mse"] + self.vlb_weight * self.num_steps * terms["vlb"].to(terms["mse"].dtype)
        return terms

    def training_loss(self, denoiser: Denoiser, x0: torch.Tensor, t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Return the per-sample training loss, shape (N,): the squared error, plus the weighted bound term with ``learn_sigma``."""
        return self.training_terms(denoiser, x0, t, noise)["loss"]

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
                training timesteps; returns this diffusion's parameterisation
                (with ``learn_sigma``, followed by the variance output along dim 1).
            noise: initial state (N, ...); its dtype is the state's dtype.
            num_sampling_steps: K respaced steps (see :func:`respaced_timesteps`).
            eta: 0 for deterministic DDIM, 1 for ancestral DDPM on the respaced
                schedule, values between interpolate.
            temperature: multiplies the std of the noise injected at each step
                (no effect when ``eta`` is 0).
            clip_x0: clamp the predicted ``x_0`` to [-clip_x0, clip_x0] when set.

        With ``learn_sigma`` and ``eta = 1`` each step draws from
        ``N(mu, var)``: ``mu`` is the posterior mean given ``x0_hat`` and
        ``var`` interpolates between the respaced chain's own ``beta`` and
        ``beta_tilde`` (``beta = 1 - abar_t / abar_prev`` over the skipped
        steps), as improved DDPM and MAR do when sampling with fewer steps.
        Any other ``eta`` runs the DDIM update and ignores the variance output,
        as DDIM sampling in the improved-DDPM code does.

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
            variance_output = None
            if self.learn_sigma:
                output, variance_output = output.chunk(2, dim=1)  # 2 x (N, C, ...)
            x0, eps = to_x0_eps(x, output, math.sqrt(abar), math.sqrt(1 - abar), self.parameterisation)
            if clip_x0 is not None:
                x0 = x0.clamp(-clip_x0, clip_x0)
                eps = (x - math.sqrt(abar) * x0) / math.sqrt(1 - abar)

            if variance_output is not None and eta == 1.0:
                x = self._learned_variance_step(x, x0, variance_output, abar, abar_prev, t_prev is None, temperature, generator)
                continue

            # Posterior std of q(x_prev | x_t, x_0) on the respaced chain, scaled by eta.
            variance = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev) if t_prev is not None else 0.0
            std = eta * math.sqrt(max(variance, 0.0))
            x = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - std * std, 0.0)) * eps  # (N, ...)
            if std > 0:
                z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                x = x + temperature * std * z
        return x

    @staticmethod
    def _learned_variance_step(
        x: torch.Tensor, x0: torch.Tensor, variance_output: torch.Tensor, abar: float, abar_prev: float, last: bool, temperature: float, generator: torch.Generator | None
    ) -> torch.Tensor:
        """One ancestral step from ``abar`` to ``abar_prev`` with the learned variance; returns the new state."""
        beta = 1 - abar / abar_prev  # of the respaced step
        coef_x0 = math.sqrt(abar_prev) * beta / (1 - abar)
        coef_xt = math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar)
        mean = coef_x0 * x0 + coef_xt * x  # (N, ...)
        if last:
            return mean  # the step to t = 0 adds no noise; the mean is x0_hat
        beta_tilde = beta * (1 - abar_prev) / (1 - abar)
        log_var = interpolated_log_variance(variance_output, math.log(beta_tilde), math.log(beta))
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return mean + temperature * torch.exp(0.5 * log_var) * z
