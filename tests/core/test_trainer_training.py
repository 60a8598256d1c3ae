"""Whole training runs of a tiny MLP in one process: accumulation, clipping, exact resume, loader workers."""

from __future__ import annotations

import importlib.util
import sys
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import default_collate

from mmtk.core.checkpoint import latest_checkpoint, load_checkpoint
from mmtk.core.errors import InputError, MmtkError
from mmtk.core.recipe import apply_overrides, build
from mmtk.core.rundir import RunDir
from mmtk.core.seeding import seed_everything
from mmtk.core.trainer import SeededDataset, StepBatchSampler, Trainer

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


tasks = _tasks()


def _recipe(*overrides: str):
    return build(tasks.TinyRecipe, apply_overrides({}, list(overrides)))


def _fit(path: Path, *overrides: str, resume: bool = False, task_cls=None):
    """Train the tiny task in ``path``; return (trainer, summary)."""
    recipe = _recipe(*overrides)
    run = RunDir(path, TOOL, resume=resume, resumable_keys=frozenset({"crash_at_step"}))
    task = (task_cls or tasks.TinyTask)(recipe)
    trainer = Trainer(task, recipe.train, run, seed=recipe.seed, device=recipe.device)
    run.start(recipe)
    try:
        summary = trainer.fit()
    finally:
        run.close()
    return trainer, summary


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_accumulation_equals_full_batch(tmp_path):
    full, _ = _fit(tmp_path / "full", "dropout=0")
    accumulated, _ = _fit(tmp_path / "accumulated", "dropout=0", "train.grad_accum=4")

    assert _max_difference(full.model.state_dict(), accumulated.model.state_dict()) < 1e-6
    assert _max_difference(full.ema.shadow, accumulated.ema.shadow) < 1e-6
    full_losses = [r["loss"] for r in _records(tmp_path / "full") if "loss" in r]
    accumulated_losses = [r["loss"] for r in _records(tmp_path / "accumulated") if "loss" in r]
    assert len(full_losses) == 4
    assert full_losses == pytest.approx(accumulated_losses, abs=1e-6)


def test_clipping_scales_update_to_max_norm(tmp_path):
    overrides = ["dropout=0", "train.steps=1", "train.optimizer=sgd", "train.momentum=0", "train.weight_decay=0", "train.lr=1", "train.schedule=constant", "train.warmup_steps=0", "train.ema_decay=0", "train.grad_clip=0.5"]
    recipe = _recipe(*overrides)

    # Independent reference: the same initial model and the same first batch, differentiated by hand.
    seed_everything(recipe.seed)
    reference = tasks.MLP(dropout=0.0)
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    sampler = StepBatchSampler(96, 8, 1, 0, 1, seed=recipe.seed, start_step=0, steps=1)
    dataset = SeededDataset(tasks.NoisyRegression())
    batch = default_collate([dataset[key] for key in sampler.micro_batches(0)[0]])
    reference(batch["x"], batch["y"]).backward()
    grads = {name: p.grad for name, p in reference.named_parameters()}
    norm = torch.sqrt(sum((g**2).sum() for g in grads.values())).item()
    assert norm > 0.5

    trainer, summary = _fit(tmp_path / "clip", *overrides)

    assert summary["metrics"]["grad_norm"] == pytest.approx(norm, rel=1e-5)
    coefficient = 0.5 / (norm + 1e-6)
    trained = dict(trainer.model.named_parameters())
    for name, grad in grads.items():
        update = trained[name].detach() - initial[name]
        assert torch.allclose(update, -coefficient * grad, atol=1e-6), name
    update_norm = torch.sqrt(sum(((trained[n].detach() - initial[n]) ** 2).sum() for n in grads)).item()
    assert update_norm == pytest.approx(0.5, rel=1e-5)


def test_crash_and_resume_is_bit_exact(tmp_path):
    # Dropout, per-sample noise, EMA, warm-up, accumulation and a half-filled metric window all cross the restart.
    uninterrupted, _ = _fit(tmp_path / "a", "train.grad_accum=2")

    with pytest.raises(RuntimeError, match="simulated crash in optimizer step 6"):
        _fit(tmp_path / "b", "train.grad_accum=2", "crash_at_step=6")
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "ckpt-000000004.pt"
    assert [r["step"] for r in _records(tmp_path / "b")] == [3, 6]

    resumed, summary = _fit(tmp_path / "b", "train.grad_accum=2", resume=True)

    assert summary["start_step"] == 4
    assert summary["steps"] == 12
    for key, value in uninterrupted.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    for key, value in uninterrupted.ema.shadow.items():
        assert torch.equal(value, resumed.ema.shadow[key]), key
    for key, state in uninterrupted.optimizer.state_dict()["state"].items():
        assert torch.equal(state["exp_avg_sq"], resumed.optimizer.state_dict()["state"][key]["exp_avg_sq"])
    assert (tmp_path / "b" / "metrics.jsonl").read_text() == (tmp_path / "a" / "metrics.jsonl").read_text()


def test_resume_of_finished_run(tmp_path):
    _fit(tmp_path / "run")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text()

    _, summary = _fit(tmp_path / "run", resume=True)

    assert summary["start_step"] == 12
    assert summary["eval"]["mse"] > 0
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == lines


def test_checkpoint_contents(tmp_path):
    _fit(tmp_path / "run")
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["ckpt-000000008.pt", "ckpt-000000012.pt"]

    state = torch.load(tmp_path / "run" / "checkpoints" / names[-1], weights_only=True)
    assert state["tool"] == TOOL
    assert state["step"] == 12
    assert state["schedule"] == {"step": 11}
    assert set(state) >= {"model", "optimizer", "ema", "rng", "data", "metric_window", "config"}
    assert len(state["rng"]) == 1
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / names[-1], expected_tool=TOOL)["step"] == 12


def test_loader_workers_same_result(tmp_path):
    main_process, _ = _fit(tmp_path / "w0", "train.steps=4")
    workers, _ = _fit(tmp_path / "w2", "train.steps=4", "train.num_workers=2")
    for key, value in main_process.model.state_dict().items():
        assert torch.equal(value, workers.model.state_dict()[key]), key


def test_schedule_values_in_metrics(tmp_path):
    _fit(tmp_path / "run", "train.log_every=1", "train.min_lr_ratio=0.1")
    lrs = [r["lr"] for r in _records(tmp_path / "run") if "lr" in r]
    # The record of step s contains the rate of optimizer step s - 1. Warm-up is 3 of 12 steps, peak 1e-2.
    assert lrs[:3] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2])
    assert lrs[6] == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 3 / 9)).item())))


def test_uneven_batch_split_rejected(tmp_path):
    recipe = _recipe("train.batch_size=6", "train.grad_accum=4")
    run = RunDir(tmp_path / "run", TOOL)
    with pytest.raises(InputError, match="multiple of 4"):
        Trainer(tasks.TinyTask(recipe), recipe.train, run, seed=0, device="cpu")
    assert not (tmp_path / "run").exists()


def test_small_dataset_rejected_before_start(tmp_path):
    recipe = _recipe("train.batch_size=128")
    with pytest.raises(InputError, match="96 samples"):
        Trainer(tasks.TinyTask(recipe), recipe.train, RunDir(tmp_path / "run", TOOL), seed=0, device="cpu")
    assert not (tmp_path / "run").exists()


def test_resume_beyond_steps_rejected(tmp_path):
    _fit(tmp_path / "run")
    recipe = _recipe("train.steps=4")
    with pytest.raises(InputError, match="beyond train.steps=4"):
        Trainer(tasks.TinyTask(recipe), recipe.train, RunDir(tmp_path / "run", TOOL, resume=True), seed=0, device="cpu")


def test_fit_requires_started_run(tmp_path):
    recipe = _recipe()
    trainer = Trainer(tasks.TinyTask(recipe), recipe.train, RunDir(tmp_path / "run", TOOL), seed=0, device="cpu")
    with pytest.raises(MmtkError, match="context.start"):
        trainer.fit()


class NanTask(tasks.TinyTask):
    def training_step(self, model, batch):
        loss, metrics = super().training_step(model, batch)
        return loss * float("nan"), metrics


def test_nan_loss_stops_run(tmp_path):
    with pytest.raises(MmtkError, match="became nan at step 3"):
        _fit(tmp_path / "run", task_cls=NanTask)


@pytest.mark.parametrize(
    ("overrides", "present", "absent"),
    [
        (["train.grad_clip=1.0"], "lower train.lr", "train.grad_clip"),
        (["train.grad_clip=0"], "or set train.grad_clip", "precision"),
        (["train.grad_clip=1.0", "train.precision=bf16"], "or use train.precision=fp32", "grad_clip"),
    ],
)
def test_nan_loss_suggests_only_applicable_remedies(tmp_path, overrides, present, absent):
    with pytest.raises(MmtkError) as error:
        _fit(tmp_path / "run", *overrides, task_cls=NanTask)
    assert present in str(error.value)
    assert absent not in str(error.value)


def test_bf16_autocast_on_cpu(tmp_path):
    full, _ = _fit(tmp_path / "fp32", "dropout=0", "train.steps=3")
    low, summary = _fit(tmp_path / "bf16", "dropout=0", "train.steps=3", "train.precision=bf16")

    assert summary["precision"] == "bf16"
    assert next(low.model.parameters()).dtype == torch.float32
    difference = _max_difference(full.model.state_dict(), low.model.state_dict())
    # bfloat16 keeps 8 significant bits, so the weights move apart a little, but not far.
    assert 0 < difference < 1e-2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
def test_cuda_request_exits_2_without_output(tmp_path):
    from mmtk.core.runner import RunOptions, run_tool

    def tool(context):
        recipe = context.recipe
        trainer = Trainer(tasks.TinyTask(recipe), recipe.train, context.run, seed=recipe.seed, device=recipe.device)
        context.start()
        return trainer.fit()

    recipe_file = tmp_path / "tiny.yaml"
    recipe_file.write_text("seed: 0\n")
    code = run_tool(TOOL, tasks.TinyRecipe, recipe_file, [], RunOptions(out=tmp_path / "run", device="cuda"), tool)

    assert code == 2
    assert not (tmp_path / "run").exists()
