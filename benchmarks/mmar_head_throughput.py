"""Diffusion-head sampling throughput: one batched call over all tokens against a per-token loop.

Both sides run the same head (adaLN MLP, random weights), the same number of
DDPM steps and the same torch thread count. The batched side samples every
token in one call to ``DiffusionLoss.sample``, and the loop side calls it
once per token. Reports tokens per second and the ratio.

    .venv/bin/python benchmarks/mmar_head_throughput.py --tokens 256 --steps 50 --threads 1
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from mmtk.mmar.head import DiffusionLoss


def timed(function, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256, help="tokens sampled (e.g. one 16x16 image)")
    parser.add_argument("--steps", type=int, default=50, help="diffusion sampling steps")
    parser.add_argument("--token-dim", type=int, default=16)
    parser.add_argument("--cond-dim", type=int, default=192)
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 1024], help="head widths to measure (depth 3)")
    parser.add_argument("--cfg", type=float, default=3.0, help="guidance scale (both sides evaluate both conditions)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}, tokens {args.tokens}, steps {args.steps}, cfg {args.cfg}")
    print("| head | loop tokens/s | batched tokens/s | batched / loop |")
    print("|---|---|---|---|")
    for width in args.widths:
        torch.manual_seed(0)
        head = DiffusionLoss(args.token_dim, args.cond_dim, width=width, depth=3).eval()
        for parameter in head.parameters():
            torch.nn.init.normal_(parameter, std=0.02)
        z = torch.randn(args.tokens, args.cond_dim)
        z_uncond = torch.randn(args.tokens, args.cond_dim)

        def batched() -> None:
            head.sample(z, z_uncond, args.cfg, args.steps)

        def loop() -> None:
            for i in range(args.tokens):
                head.sample(z[i : i + 1], z_uncond[i : i + 1], args.cfg, args.steps)

        batched_s = timed(batched, args.repeats)
        loop_s = timed(loop, max(1, args.repeats - 2))
        print(f"| 3x{width} | {args.tokens / loop_s:.2f} | {args.tokens / batched_s:.2f} | {loop_s / batched_s:.1f}x |")


if __name__ == "__main__":
    main()
