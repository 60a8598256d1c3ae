"""Diffusion utilities: schedule, respacing, conversions, oracle sampling and bf16 error amplification."""

from __future__ import annotations

import math

import pytest
import torch

from mmtk.nn.diffusion import (
    GaussianDiffusion,
    cosine_alphas_cumprod,
    error_amplification,
    from_x0_eps,
    respaced_timesteps,
    to_x0_eps,
)

MIXTURE_MEAN = 0.954
MIXTURE_STD = 0.3


def mixture_posterior_mean(x_t: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """Exact E[x_0 | x_t] for x_0 ~ 0.5 N(-m, s^2) + 0.5 N(m, s^2), per coordinate."""
    s2 = MIXTURE_STD**2
    variance = alpha * alpha * s2 + sigma * sigma
    log_w_plus = -((x_t - alpha * MIXTURE_MEAN) ** 2) / (2 * variance)
    log_w_minus = -((x_t + alpha * MIXTURE_MEAN) ** 2) / (2 * variance)
    w_plus = torch.sigmoid(log_w_plus - log_w_minus)
    gain = alpha * s2 / variance
    mean_plus = MIXTURE_MEAN + gain * (x_t - alpha * MIXTURE_MEAN)
    mean_minus = -MIXTURE_MEAN + gain * (x_t + alpha * MIXTURE_MEAN)
    return w_plus * mean_plus + (1 - w_plus) * mean_minus


def oracle_denoiser(diffusion: GaussianDiffusion, round_to: torch.dtype | None):
    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = float(diffusion.alphas_cumprod[int(t[0])])
        alpha, sigma = math.sqrt(abar), math.sqrt(1 - abar)
        x0 = mixture_posterior_mean(x_t, alpha, sigma)
        eps = (x_t - alpha * x0) / sigma
        output = from_x0_eps(x0, eps, alpha, sigma, diffusion.parameterisation)
        if round_to is not None:
            output = output.to(round_to).to(x_t.dtype)
        return output

    return denoise


def mixture_samples(n: int, generator: torch.Generator) -> torch.Tensor:
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
    return signs * MIXTURE_MEAN + MIXTURE_STD * torch.randn(n, generator=generator, dtype=torch.float64)


def wasserstein_1d(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.flatten().sort().values - b.flatten().sort().values).abs().mean())


def test_cosine_schedule_endpoints():
    abar = cosine_alphas_cumprod(1000)
    assert abar.shape == (1000,)
    assert abar[999].item() == pytest.approx(2.43e-9, rel=0.01)
    assert abar[0].item() == pytest.approx(0.99996, abs=1e-5)
    assert bool((abar[1:] < abar[:-1]).all())


def test_respacing_starts_at_last_step():
    steps = respaced_timesteps(25, 1000)
    assert steps[0].item() == 999
    assert steps[1].item() == 957
    assert steps[-1].item() == 0
    assert len(steps) == 25
    assert respaced_timesteps(1000, 1000).tolist() == list(range(999, -1, -1))


@pytest.mark.parametrize("parameterisation", ["eps", "v", "x0"])
def test_conversions_invert_in_float64(parameterisation):
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 5, generator=generator, dtype=torch.float64)
    eps = torch.randn(64, 5, generator=generator, dtype=torch.float64)
    diffusion = GaussianDiffusion(parameterisation=parameterisation)
    t = torch.randint(0, 999, (64,), generator=generator)
    alpha, sigma = diffusion.alpha_sigma(t, x0)
    x_t = alpha * x0 + sigma * eps
    output = from_x0_eps(x0, eps, alpha, sigma, parameterisation)
    x0_back, eps_back = to_x0_eps(x_t, output, alpha, sigma, parameterisation)
    assert torch.allclose(x0_back, x0, atol=1e-9, rtol=0)
    assert torch.allclose(eps_back, eps, atol=1e-9, rtol=0)


def test_v_target_by_hand():
    x0 = torch.tensor([[2.0]], dtype=torch.float64)
    eps = torch.tensor([[-1.0]], dtype=torch.float64)
    alpha, sigma = 0.6, 0.8
    v = from_x0_eps(x0, eps, alpha, sigma, "v")
    assert v.item() == pytest.approx(0.6 * -1.0 - 0.8 * 2.0)


@pytest.mark.parametrize("num_steps, eps_factor, v_factor", [(25, 1326, 0.065), (100, 315, 0.016), (1000, 31, 0.0015)])
def test_first_step_amplification(num_steps, eps_factor, v_factor):
    abar = cosine_alphas_cumprod(1000)
    t, t_next = respaced_timesteps(num_steps)[:2].tolist()
    args = (math.sqrt(abar[t]), math.sqrt(1 - abar[t]), math.sqrt(abar[t_next]), math.sqrt(1 - abar[t_next]))
    assert error_amplification(*args, "eps") == pytest.approx(eps_factor, rel=0.02)
    assert error_amplification(*args, "v") == pytest.approx(v_factor, rel=0.03)


def test_oracle_sampler_reproduces_mixture():
    generator = torch.Generator().manual_seed(1)
    diffusion = GaussianDiffusion(parameterisation="v")
    noise = torch.randn(20000, 1, generator=generator, dtype=torch.float64)
    samples = diffusion.sample(oracle_denoiser(diffusion, None), noise, num_sampling_steps=100)
    data = mixture_samples(20000, generator)
    assert wasserstein_1d(samples, data) < 0.03
    assert samples.std().item() == pytest.approx(1.0, abs=0.03)


def test_ancestral_oracle_sampler_reproduces_mixture():
    generator = torch.Generator().manual_seed(2)
    diffusion = GaussianDiffusion(parameterisation="eps")
    noise = torch.randn(20000, 1, generator=generator, dtype=torch.float64)
    samples = diffusion.sample(oracle_denoiser(diffusion, None), noise, num_sampling_steps=100, eta=1.0, generator=generator)
    data = mixture_samples(20000, generator)
    assert wasserstein_1d(samples, data) < 0.03


def test_bf16_rounding_breaks_eps_not_v():
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(4096, 1, generator=generator, dtype=torch.float64)
    deviation = {}
    for parameterisation in ("eps", "v"):
        diffusion = GaussianDiffusion(parameterisation=parameterisation)
        exact = diffusion.sample(oracle_denoiser(diffusion, None), noise, num_sampling_steps=25)
        rounded = diffusion.sample(oracle_denoiser(diffusion, torch.bfloat16), noise, num_sampling_steps=25)
        deviation[parameterisation] = (rounded - exact).pow(2).mean().sqrt().item()
    assert deviation["v"] < 1e-3
    assert deviation["eps"] > 0.1


def test_temperature_zero_makes_ancestral_deterministic():
    diffusion = GaussianDiffusion(parameterisation="v")
    noise = torch.randn(64, 2, dtype=torch.float64)
    denoise = oracle_denoiser(diffusion, None)
    first = diffusion.sample(denoise, noise, 20, eta=1.0, temperature=0.0, generator=torch.Generator().manual_seed(0))
    second = diffusion.sample(denoise, noise, 20, eta=1.0, temperature=0.0, generator=torch.Generator().manual_seed(1))
    third = diffusion.sample(denoise, noise, 20, eta=1.0, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, second)
    assert not torch.allclose(first, third)
