"""Sampling error of eps- against v-prediction when the denoiser output is rounded to bf16.

One run: for each number of sampling steps K, a deterministic DDIM sampler
(cosine schedule, T = 1000) runs from the same noise with the exact
posterior-mean denoiser of a two-Gaussian mixture per coordinate (means
+-0.954, std 0.3, unit variance), once in float64 and once with the output
rounded to bf16 (and fp16). The table gives the RMS deviation of the rounded
run from the float64 run, the 1-D Wasserstein distance of the samples to the
data, the eps/v ratio of the deviations and the analytic first-step error
amplification factors.

    .venv/bin/python benchmarks/mmar_eps_v_bf16.py --samples 20000
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch

from mmtk.nn.diffusion import GaussianDiffusion, error_amplification, from_x0_eps, respaced_timesteps

MEAN, STD = 0.954, 0.3


def posterior_mean(x_t: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    variance = alpha * alpha * STD * STD + sigma * sigma
    weight = torch.sigmoid((2 * alpha * MEAN * x_t) / variance)  # P(component +m | x_t)
    gain = alpha * STD * STD / variance
    plus = MEAN + gain * (x_t - alpha * MEAN)
    minus = -MEAN + gain * (x_t + alpha * MEAN)
    return weight * plus + (1 - weight) * minus


def denoiser(diffusion: GaussianDiffusion, dtype: torch.dtype | None):
    def run(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = float(diffusion.alphas_cumprod[int(t[0])])
        alpha, sigma = math.sqrt(abar), math.sqrt(1 - abar)
        x0 = posterior_mean(x_t, alpha, sigma)
        output = from_x0_eps(x0, (x_t - alpha * x0) / sigma, alpha, sigma, diffusion.parameterisation)
        return output if dtype is None else output.to(dtype).to(x_t.dtype)

    return run


def wasserstein_1d(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.flatten().sort().values - b.flatten().sort().values).abs().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000, help="samples per sampler run")
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100, 250, 1000], help="sampling steps K to compare")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(args.samples, 1, generator=generator, dtype=torch.float64)
    signs = torch.randint(0, 2, (args.samples, 1), generator=generator).double() * 2 - 1
    data = signs * MEAN + STD * torch.randn(args.samples, 1, generator=generator, dtype=torch.float64)
    abar = GaussianDiffusion().alphas_cumprod

    rows = []
    started = time.perf_counter()
    for k in args.steps:
        t, t_next = respaced_timesteps(k)[:2].tolist()
        factors = (math.sqrt(abar[t]), math.sqrt(1 - abar[t]), math.sqrt(abar[t_next]), math.sqrt(1 - abar[t_next]))
        row = {"K": k, "first_step": f"{t}->{t_next}", "eps_factor": error_amplification(*factors, "eps"), "v_factor": error_amplification(*factors, "v")}
        for parameterisation in ("eps", "v"):
            diffusion = GaussianDiffusion(parameterisation=parameterisation)
            exact = diffusion.sample(denoiser(diffusion, None), noise, k)
            for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
                rounded = diffusion.sample(denoiser(diffusion, dtype), noise, k)
                row[f"{parameterisation}_{name}_rms"] = float((rounded - exact).pow(2).mean().sqrt())
                row[f"{parameterisation}_{name}_w1"] = wasserstein_1d(rounded, data)
            row[f"{parameterisation}_fp64_w1"] = wasserstein_1d(exact, data)
        row["ratio_bf16"] = row["eps_bf16_rms"] / row["v_bf16_rms"]
        rows.append(row)

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}, samples {args.samples}, {time.perf_counter() - started:.1f} s")
    print("| K | first step | eps factor | v factor | eps-bf16 RMS | v-bf16 RMS | eps/v (bf16) | eps-fp16 RMS | W1 eps-bf16 | W1 v-bf16 | W1 fp64 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['K']} | {r['first_step']} | {r['eps_factor']:.0f} | {r['v_factor']:.4f} | {r['eps_bf16_rms']:.3g} | {r['v_bf16_rms']:.2g} | {r['ratio_bf16']:.0f} | {r['eps_fp16_rms']:.3g} | {r['eps_bf16_w1']:.3f} | {r['v_bf16_w1']:.3f} | {r['v_fp64_w1']:.3f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
