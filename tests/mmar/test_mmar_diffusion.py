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


# ------------------------------------------------------------ learned variance

GAUSSIAN_MEAN = 0.5
GAUSSIAN_STD = 0.6


def respaced_previous(num_sampling_steps: int) -> dict[int, int | None]:
    steps = respaced_timesteps(num_sampling_steps).tolist()
    return {t: (steps[i + 1] if i + 1 < len(steps) else None) for i, t in enumerate(steps)}


def gaussian_oracle(diffusion: GaussianDiffusion, num_sampling_steps: int, exact_variance: bool, variance_values: list[float]):
    """Exact denoiser for x_0 ~ N(m, s^2), with the variance output that gives each respaced step's true reverse variance.

    For Gaussian data q(x_prev | x_t) is Gaussian with variance
    beta_tilde + c^2 Var(x_0 | x_t), c the posterior-mean weight of x_0; it
    lies between beta_tilde and beta, so a v in [-1, 1] reaches it.
    With ``exact_variance`` False the output is v = -1 (beta_tilde).
    """
    previous = respaced_previous(num_sampling_steps)
    m, s2 = GAUSSIAN_MEAN, GAUSSIAN_STD**2

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        step = int(t[0])
        abar = float(diffusion.alphas_cumprod[step])
        alpha, sigma = math.sqrt(abar), math.sqrt(1 - abar)
        x0 = m + alpha * s2 / (alpha * alpha * s2 + sigma * sigma) * (x_t - alpha * m)
        x0_variance = s2 * sigma * sigma / (alpha * alpha * s2 + sigma * sigma)
        output = from_x0_eps(x0, (x_t - alpha * x0) / sigma, alpha, sigma, diffusion.parameterisation)
        step_prev = previous[step]
        if step_prev is None:
            return torch.cat([output, torch.zeros_like(x_t)], dim=1)
        abar_prev = float(diffusion.alphas_cumprod[step_prev])
        beta = 1 - abar / abar_prev
        beta_tilde = beta * (1 - abar_prev) / (1 - abar)
        weight_x0 = math.sqrt(abar_prev) * beta / (1 - abar)
        variance = beta_tilde + weight_x0**2 * x0_variance if exact_variance else beta_tilde
        v = 2 * (math.log(variance) - math.log(beta_tilde)) / (math.log(beta) - math.log(beta_tilde)) - 1
        variance_values.append(v)
        return torch.cat([output, torch.full_like(x_t, v)], dim=1)

    return denoise


@pytest.mark.parametrize("parameterisation", ["v", "eps", "x0"])
def test_learned_variance_sampler_exact_gaussian(parameterisation):
    diffusion = GaussianDiffusion(parameterisation=parameterisation, learn_sigma=True)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(40000, 1, generator=generator, dtype=torch.float64)
    variance_values: list[float] = []
    samples = diffusion.sample(gaussian_oracle(diffusion, 5, True, variance_values), noise, num_sampling_steps=5, eta=1.0, generator=generator)
    assert min(variance_values) >= -1.0
    assert max(variance_values) <= 1.0
    assert samples.mean().item() == pytest.approx(GAUSSIAN_MEAN, abs=0.01)
    assert samples.var().item() == pytest.approx(GAUSSIAN_STD**2, rel=0.03)


def test_posterior_variance_too_small_in_five_steps():
    diffusion = GaussianDiffusion(parameterisation="v", learn_sigma=True)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(40000, 1, generator=generator, dtype=torch.float64)
    samples = diffusion.sample(gaussian_oracle(diffusion, 5, False, []), noise, num_sampling_steps=5, eta=1.0, generator=generator)
    # beta_tilde alone is the variance for a point mass, so five steps shrink the spread.
    assert samples.var().item() < 0.6 * GAUSSIAN_STD**2


def mixture_oracle_with_variance(diffusion: GaussianDiffusion, v: float):
    plain = oracle_denoiser(diffusion, None)

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([plain(x_t, t), torch.full_like(x_t, v)], dim=1)

    return denoise


def test_posterior_variance_output_matches_fixed_ddpm():
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(20000, 1, generator=generator, dtype=torch.float64)
    fixed = GaussianDiffusion(parameterisation="v")
    learned = GaussianDiffusion(parameterisation="v", learn_sigma=True)
    reference = fixed.sample(oracle_denoiser(fixed, None), noise, 100, eta=1.0, generator=torch.Generator().manual_seed(6))
    samples = learned.sample(mixture_oracle_with_variance(learned, -1.0), noise, 100, eta=1.0, generator=torch.Generator().manual_seed(6))
    assert torch.allclose(samples, reference, atol=1e-9, rtol=0)
    # The mixture has mean 0 and variance m^2 + s^2 = 1.
    assert samples.mean().item() == pytest.approx(0.0, abs=0.02)
    assert samples.var().item() == pytest.approx(MIXTURE_MEAN**2 + MIXTURE_STD**2, rel=0.03)


def test_ddim_ignores_variance_output():
    noise = torch.randn(256, 1, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    fixed = GaussianDiffusion(parameterisation="eps")
    learned = GaussianDiffusion(parameterisation="eps", learn_sigma=True)
    reference = fixed.sample(oracle_denoiser(fixed, None), noise, 20, eta=0.0)
    samples = learned.sample(mixture_oracle_with_variance(learned, 0.7), noise, 20, eta=0.0)
    assert torch.equal(samples, reference)


@pytest.mark.parametrize("parameterisation", ["eps", "v", "x0"])
def test_vlb_term_by_hand(parameterisation):
    from scipy.stats import norm

    diffusion = GaussianDiffusion(parameterisation=parameterisation, learn_sigma=True)
    abar = diffusion.alphas_cumprod
    x0 = torch.tensor([[0.3, -0.2], [0.25, -1.3]], dtype=torch.float64)
    # Sample 1 sits at t = 0, where the step std is about 0.005, so its x0_hat is close to x0.
    x0_hat = torch.tensor([[0.1, 0.4], [0.252, -1.298]], dtype=torch.float64)
    x_t = torch.tensor([[0.5, -0.7], [0.26, -1.2]], dtype=torch.float64)
    v = torch.tensor([[0.3, -0.6], [0.5, -0.2]], dtype=torch.float64)
    t = torch.tensor([5, 0])
    alpha, sigma = diffusion.alpha_sigma(t, x0)
    output = from_x0_eps(x0_hat, (x_t - alpha * x0_hat) / sigma, alpha, sigma, parameterisation)
    terms = diffusion.vlb_term(x0, x_t, t, output, v)

    # Sample 0, t = 5: KL between two 1-D Gaussians per dimension, in bits.
    a_t, a_prev = float(abar[5]), float(abar[4])
    beta = 1 - a_t / a_prev
    beta_tilde = beta * (1 - a_prev) / (1 - a_t)
    c0, ct = math.sqrt(a_prev) * beta / (1 - a_t), math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)
    kl = []
    for d in range(2):
        true_mean = c0 * x0[0, d].item() + ct * x_t[0, d].item()
        model_mean = c0 * x0_hat[0, d].item() + ct * x_t[0, d].item()
        f = (v[0, d].item() + 1) / 2
        model_std = math.sqrt(beta**f * beta_tilde ** (1 - f))
        true_std = math.sqrt(beta_tilde)
        kl.append(math.log(model_std / true_std) + (true_std**2 + (true_mean - model_mean) ** 2) / (2 * model_std**2) - 0.5)
    assert terms[0].item() == pytest.approx(sum(kl) / 2 / math.log(2), rel=1e-9)

    # Sample 1, t = 0: the model step ends at x0_hat. The bins are 2/255 wide, and -1.3 lies in the lower tail.
    # beta_tilde is 0 at t = 0, so the lower variance bound is beta_tilde at t = 1.
    a_0 = float(abar[0])
    beta_0 = 1 - a_0
    a_1 = float(abar[1])
    beta_1 = 1 - a_1 / a_0
    beta_tilde_1 = beta_1 * (1 - a_0) / (1 - a_1)
    nll = []
    for d in range(2):
        mean = x0_hat[1, d].item()  # posterior mean at t = 0 is x0_hat
        f = (v[1, d].item() + 1) / 2
        std = math.sqrt(beta_0**f * beta_tilde_1 ** (1 - f))
        x = x0[1, d].item()
        if x < -0.999:
            probability = norm.cdf(x + 1 / 255, mean, std)
        else:
            probability = norm.cdf(x + 1 / 255, mean, std) - norm.cdf(x - 1 / 255, mean, std)
        nll.append(-math.log(probability))
    assert terms[1].item() == pytest.approx(sum(nll) / 2 / math.log(2), rel=1e-6)


def test_vlb_term_trains_only_variance():
    diffusion = GaussianDiffusion(parameterisation="v", learn_sigma=True)
    generator = torch.Generator().manual_seed(8)
    x0 = torch.randn(16, 3, generator=generator)
    output = torch.randn(16, 6, generator=generator, requires_grad=True)
    terms = diffusion.training_terms(lambda x_t, t: output, x0, torch.randint(1, 1000, (16,), generator=generator), torch.randn(16, 3, generator=generator))
    terms["vlb"].sum().backward()
    assert torch.count_nonzero(output.grad[:, :3]).item() == 0
    assert torch.count_nonzero(output.grad[:, 3:]).item() == 48
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vlb"])
