"""A tiny regression task that exercises every part of the trainer.

Loaded by path from the trainer tests and from the subprocesses they start.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from mmtk.core.recipe import param
from mmtk.core.trainer import TrainConfig, TrainingTask

INPUTS = 6
OUTPUTS = 2


class NoisyRegression(Dataset):
    """Fixed inputs x [n, 6] and targets y = x @ w + 0.1 * sin(3x) [n, 2]; __getitem__ adds random input noise."""

    def __init__(self, size: int = 96, noise: float = 0.05) -> None:
        generator = torch.Generator().manual_seed(1234)
        self.x = torch.randn(size, INPUTS, generator=generator)
        w = torch.randn(INPUTS, OUTPUTS, generator=generator)
        self.y = self.x @ w + 0.1 * torch.sin(3 * self.x[:, :OUTPUTS])
        self.noise = noise

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        # Draws from two global generators, so per-sample seeding is exercised.
        jitter = torch.randn(INPUTS) * self.noise + float(np.random.uniform(-1e-3, 1e-3))
        return {"x": self.x[index] + jitter, "y": self.y[index]}


class MLP(nn.Module):
    def __init__(self, width: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(INPUTS, width), nn.Tanh(), nn.Dropout(dropout), nn.Linear(width, OUTPUTS))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.mean((self.net(x) - y) ** 2)


@dataclass
class TinyTrainConfig(TrainConfig):
    """TrainConfig with this task's defaults; a subclass keeps them when a recipe sets only some train keys."""

    steps: int = param(12, min=1, help="optimizer steps")
    batch_size: int = param(8, min=1, help="global batch size")
    lr: float = param(1e-2, min=0.0, help="peak learning rate")
    warmup_steps: int = param(3, min=0, help="warm-up steps")
    ema_decay: float = param(0.9, min=0.0, max=0.999999999, help="EMA decay")
    log_every: int = param(3, min=1, help="steps between metric records")
    checkpoint_every: int = param(4, min=0, help="steps between checkpoints")
    progress: bool = param(False, help="progress bar")


@dataclass
class TinyRecipe:
    seed: int = param(0, help="random seed")
    device: str = param("cpu", help="torch device")
    dropout: float = param(0.1, min=0.0, max=0.9, help="dropout probability")
    step_sleep: float = param(0.0, min=0.0, help="seconds to sleep in each training step")
    crash_at_step: int = param(0, min=0, help="raise in the training step once this many steps are done (0: never)")
    train: TinyTrainConfig = field(default_factory=TinyTrainConfig)


class TinyTask(TrainingTask):
    def __init__(self, recipe: TinyRecipe) -> None:
        self.recipe = recipe

    def build_model(self) -> nn.Module:
        return MLP(dropout=self.recipe.dropout)

    def train_dataset(self) -> Dataset:
        return NoisyRegression()

    def training_step(self, model, batch):
        if self.recipe.crash_at_step and self.global_step >= self.recipe.crash_at_step:
            raise RuntimeError(f"simulated crash in optimizer step {self.global_step}")
        if self.recipe.step_sleep:
            time.sleep(self.recipe.step_sleep)
        loss = model(batch["x"], batch["y"])
        return loss, {"abs_x": batch["x"].abs().mean()}

    def evaluate(self, model):
        data = NoisyRegression(noise=0.0)
        return {"mse": float(model(data.x, data.y))}


def main() -> None:
    """Train TinyTask in the run folder argv[1]; argv[2] is 'new' or 'resume', the rest are overrides."""
    from mmtk.core.recipe import build
    from mmtk.core.runner import RunOptions, run_tool
    from mmtk.core.trainer import Trainer

    torch.set_num_threads(1)
    out, mode, *overrides = sys.argv[1:]

    def tool(context):
        recipe = context.recipe
        trainer = Trainer(TinyTask(recipe), recipe.train, context.run, seed=recipe.seed, device=recipe.device)
        context.start()
        return trainer.fit()

    recipe_file = Path(out).parent / f"{Path(out).name}-recipe.yaml"
    recipe_file.write_text("seed: 0\n")
    code = run_tool("tiny-train", TinyRecipe, recipe_file, overrides, RunOptions(out=Path(out), resume=mode == "resume"), tool, resumable_keys=frozenset({"crash_at_step", "step_sleep"}))
    sys.exit(code)


if __name__ == "__main__":
    main()
