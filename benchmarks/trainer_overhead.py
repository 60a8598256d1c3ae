"""Time the shared trainer against a plain PyTorch loop doing the same work.

Both sides train the same MLP regression with AdamW, warm-up plus cosine decay,
gradient clipping and a shuffled DataLoader, for the same number of steps, in
one process with ``torch.set_num_threads(1)``. The trainer also runs its
per-sample seeding, metric averaging and one final checkpoint; EMA is off.

Usage: ``python benchmarks/trainer_overhead.py [--steps 300] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mmtk.core.logging import setup_logging
from mmtk.core.rundir import RunDir
from mmtk.core.trainer import TrainConfig, Trainer, TrainingTask


@dataclass
class Case:
    name: str
    width: int
    batch_size: int


CASES = [Case("small MLP (6-64-2), batch 32", 64, 32), Case("wide MLP (256-1024-1024-256), batch 64", 1024, 64)]


def make_data(case: Case, samples: int = 4096) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    inputs = 6 if case.width == 64 else 256
    outputs = 2 if case.width == 64 else 256
    x = torch.randn(samples, inputs, generator=generator)
    y = torch.randn(samples, outputs, generator=generator)
    return TensorDataset(x, y)


def make_model(case: Case, data: TensorDataset) -> nn.Module:
    inputs, outputs = data.tensors[0].shape[1], data.tensors[1].shape[1]
    if case.width == 64:
        return nn.Sequential(nn.Linear(inputs, 64), nn.GELU(), nn.Linear(64, outputs))
    return nn.Sequential(nn.Linear(inputs, case.width), nn.GELU(), nn.Linear(case.width, case.width), nn.GELU(), nn.Linear(case.width, outputs))


def plain_loop(case: Case, data: TensorDataset, steps: int) -> float:
    """Return seconds for ``steps`` optimizer steps of a hand-written loop."""
    started = time.perf_counter()
    torch.manual_seed(0)
    model = make_model(case, data)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    warmup = steps // 10
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))))
    loader = DataLoader(data, batch_size=case.batch_size, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
    step = 0
    while step < steps:
        for x, y in loader:
            loss = torch.mean((model(x) - y) ** 2)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            step += 1
            if step == steps:
                break
    return time.perf_counter() - started


class RegressionTask(TrainingTask):
    def __init__(self, case: Case, data: TensorDataset) -> None:
        self.case = case
        self.data = data

    def build_model(self) -> nn.Module:
        return make_model(self.case, self.data)

    def train_dataset(self) -> TensorDataset:
        return self.data

    def training_step(self, model, batch):
        x, y = batch
        loss = torch.mean((model(x) - y) ** 2)
        return loss, {}


def with_trainer(case: Case, data: TensorDataset, steps: int, folder: Path) -> float:
    """Return seconds for ``steps`` optimizer steps through :class:`Trainer`, including its final checkpoint."""
    config = TrainConfig(steps=steps, batch_size=case.batch_size, lr=1e-3, warmup_steps=steps // 10, checkpoint_every=0, log_every=50, progress=False)
    run = RunDir(folder, "trainer-benchmark")
    run.start({"benchmark": case.name})
    started = time.perf_counter()
    try:
        Trainer(RegressionTask(case, data), config, run, seed=0, device="cpu").fit()
    finally:
        run.close()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.set_num_threads(1)
    setup_logging(-1)
    print(f"torch {torch.__version__}, torch.set_num_threads(1), {args.steps} steps, best of {args.repeats}")
    print("| case | plain loop (s) | mmtk Trainer (s) | Trainer / plain |")
    print("| --- | --- | --- | --- |")
    for case in CASES:
        data = make_data(case)
        plain_times, trainer_times = [], []
        for repeat in range(args.repeats):
            plain_times.append(plain_loop(case, data, args.steps))
            with tempfile.TemporaryDirectory() as folder:
                trainer_times.append(with_trainer(case, data, args.steps, Path(folder) / f"run{repeat}"))
        plain, trainer = min(plain_times), min(trainer_times)
        print(f"| {case.name} | {plain:.3f} | {trainer:.3f} | {trainer / plain:.2f} |")


if __name__ == "__main__":
    main()
