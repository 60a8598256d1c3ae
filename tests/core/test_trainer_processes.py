"""Trainer runs in separate processes: SIGTERM during training, and DDP/FSDP under torchrun with gloo."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmtk.core.checkpoint import latest_checkpoint
from mmtk.core.recipe import apply_overrides, build
from mmtk.core.rundir import RunDir
from mmtk.core.trainer import Trainer

_TASKS_PATH = Path(__file__).with_name("trainer_tasks.py")
TOOL = "tiny-train"


def _tasks():
    """Import the tiny task module by path (test folders are not packages), once per session."""
    name = "mmtk_test_trainer_tasks"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _TASKS_PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _environment() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="240")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _fit_here(path: Path, *overrides: str, resume: bool = False):
    """Train the tiny task in this process; return (trainer, summary)."""
    tasks = _tasks()
    recipe = build(tasks.TinyRecipe, apply_overrides({}, list(overrides)))
    run = RunDir(path, TOOL, resume=resume, resumable_keys=frozenset({"step_sleep"}))
    trainer = Trainer(tasks.TinyTask(recipe), recipe.train, run, seed=recipe.seed, device=recipe.device)
    run.start(recipe)
    try:
        summary = trainer.fit()
    finally:
        run.close()
    return trainer, summary


def _final_state(path: Path) -> dict:
    return torch.load(latest_checkpoint(path / "checkpoints"), weights_only=True)


def _losses(path: Path) -> list[float]:
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_sigterm_saves_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    overrides = ["train.steps=40", "train.checkpoint_every=0", "train.log_every=2", "train.num_workers=2"]
    command = [sys.executable, str(_TASKS_PATH), str(out), "new", *overrides, "step_sleep=0.05"]
    # A new session, so that the signal reaches the whole process group (loader worker included), as under Slurm.
    process = subprocess.Popen(command, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file():
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "training never logged a metric"
            time.sleep(0.05)
        time.sleep(0.3)  # the loader workers are running by now
        os.killpg(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()

    assert process.returncode == 1, stderr.decode()
    assert "received SIGTERM" in stderr.decode()
    assert "stopped on SIGTERM at step" in stderr.decode()
    assert "killed by signal" not in stderr.decode()
    assert not (out / "summary.json").exists()
    checkpoints = list((out / "checkpoints").iterdir())
    assert len(checkpoints) == 1
    state = torch.load(checkpoints[0], weights_only=True)
    assert 2 <= state["step"] < 40
    assert checkpoints[0].name == f"ckpt-{state['step']:09d}.pt"

    resumed, summary = _fit_here(out, *overrides, resume=True)
    assert summary["start_step"] == state["step"]
    assert summary["steps"] == 40

    uninterrupted, _ = _fit_here(tmp_path / "reference", *overrides)
    for key, value in uninterrupted.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert _losses(out) == _losses(tmp_path / "reference")


def _torchrun(out: Path, *overrides: str, mode: str = "new") -> subprocess.CompletedProcess:
    """Train the tiny task with two gloo processes under torchrun; ``mode`` is 'new' or 'resume'."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(_TASKS_PATH), str(out), mode, *overrides]
    return subprocess.run(command, env=_environment(), capture_output=True, timeout=300)


@pytest.mark.distributed
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, parallel):
    # Dropout is off: its masks come from per-rank random streams, which no layout change can reproduce.
    overrides = ["dropout=0", "train.steps=8", "train.log_every=2", f"train.parallel={parallel}"]
    result = _torchrun(tmp_path / "two", *overrides, "train.grad_accum=2")
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    meta = json.loads((tmp_path / "two" / "meta.json").read_text())
    assert meta["world_size"] == 2

    single, _ = _fit_here(tmp_path / "one", *overrides)
    state = _final_state(tmp_path / "two")

    assert state["world_size"] == 2
    assert len(state["rng"]) == 2
    for key, value in single.model.state_dict().items():
        assert torch.allclose(value, state["model"][key], rtol=0, atol=1e-6), key
    for key, value in single.ema.shadow.items():
        assert torch.allclose(value, state["ema"]["shadow"][key], rtol=0, atol=1e-6), key
    # Each rank logs the mean over its half of the batch; the all-reduced mean is the global loss.
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), abs=1e-6)


@pytest.mark.distributed
def test_two_process_resume_is_bit_exact(tmp_path):
    # Dropout on: each rank's own random stream and metric window must survive the restart.
    uninterrupted = _torchrun(tmp_path / "full")
    assert uninterrupted.returncode == 0, uninterrupted.stderr.decode()[-3000:]

    crashed = _torchrun(tmp_path / "cut", "crash_at_step=6")
    assert crashed.returncode != 0
    assert "simulated crash in optimizer step 6" in crashed.stderr.decode()

    resumed = _torchrun(tmp_path / "cut", mode="resume")
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["start_step"] == 4

    full, cut = _final_state(tmp_path / "full"), _final_state(tmp_path / "cut")
    for key, value in full["model"].items():
        assert torch.equal(value, cut["model"][key]), key
    for key, value in full["ema"]["shadow"].items():
        assert torch.equal(value, cut["ema"]["shadow"][key]), key
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == (tmp_path / "full" / "metrics.jsonl").read_text()


_BROKEN_WORKER_SCRIPT = """
import sys
import torch
sys.path.insert(0, sys.argv[2])
import trainer_tasks as tasks
from mmtk.core.recipe import apply_overrides, build
from mmtk.core.rundir import RunDir
from mmtk.core.trainer import Trainer


class BrokenSamples(torch.utils.data.Dataset):
    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        if index % 7 == 3:
            raise ValueError("broken sample")
        return self.base[index]


class BrokenTask(tasks.TinyTask):
    def train_dataset(self):
        return BrokenSamples(super().train_dataset())


recipe = build(tasks.TinyRecipe, apply_overrides({}, ["train.num_workers=1"]))
run = RunDir(sys.argv[1], "tiny")
trainer = Trainer(BrokenTask(recipe), recipe.train, run, seed=0, device="cpu")
run.start(recipe)
trainer.fit()
"""


def test_failing_loader_worker_does_not_hang(tmp_path):
    # Workers ignore SIGTERM, so a process that left them to the exit handler hung for good.
    command = [sys.executable, "-c", _BROKEN_WORKER_SCRIPT, str(tmp_path / "run"), str(_TASKS_PATH.parent)]
    result = subprocess.run(command, env=_environment(), capture_output=True, timeout=120)
    assert result.returncode == 1
    assert b"broken sample" in result.stderr
