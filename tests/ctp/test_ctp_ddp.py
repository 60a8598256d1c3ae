"""ctp-pretrain and ctp-evaluate under torchrun with two gloo processes on CPU.

torch's SyncBatchNorm rejects CPU tensors in training mode (torch 2.13
raises ValueError "SyncBatchNorm expected input tensor to be on GPU ..."
whenever a process group exists), so on gloo the tool keeps per-process
BatchNorm and logs it. Each process then normalizes with the statistics of
its own micro-batch, which is what one process with ``train.grad_accum=2``
does with the same global batch. The two runs therefore train the same
parameters; only the BatchNorm running statistics differ (DDP broadcasts
rank 0's, which saw half of each batch).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from mmtk.core.checkpoint import latest_checkpoint

RECIPE = {
    "seed": 0,
    "device": "cpu",
    "threads": 1,
    "data": {"layout": "folder"},
    "clips": {"num_frames": 8, "strides": [1, 2], "crop_size": 32, "short_sides": [32, 36], "clips_per_video": 4, "holdout_fraction": 0.34, "eval_clips": 2},
    "proxy": {"scales": [6, 8, 10]},
    "backbone": {"arch": "r3d", "depth": 10, "widths": [4, 8, 8, 8]},
    "head_hidden": 16,
    "train": {"steps": 3, "batch_size": 4, "optimizer": "sgd", "lr": 0.01, "schedule": "constant", "log_every": 1, "checkpoint_every": 0, "progress": False},
}

RUN_FILES = {"backbone.pt", "checkpoints", "clip-cache.h5", "log.txt", "meta.json", "metrics.jsonl", "recipe.yaml", "summary.json", "tracks.gif", "tracks.png"}


def _environment() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="240")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _pretrain(cwd, out, recipe, *overrides, processes: int = 1) -> subprocess.CompletedProcess:
    """Run ``mmtk ctp-pretrain`` in ``cwd``, under torchrun with gloo when ``processes`` > 1."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), "-m"] if processes > 1 else [sys.executable, "-m"]
    command = [*launcher, "mmtk_commands.main", "ctp-pretrain", str(recipe), *overrides, "--out", str(out)]
    return subprocess.run(command, cwd=cwd, env=_environment(), capture_output=True, timeout=600)


@pytest.fixture(scope="module")
def runs(video_folder, tmp_path_factory):
    """Run the tiny recipe with two processes and with one process accumulating two micro-batches."""
    root = tmp_path_factory.mktemp("ctp-ddp")
    recipe = json.loads(json.dumps(RECIPE))
    recipe["data"]["root"] = str(video_folder)
    recipe_path = root / "tiny.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))

    two_cwd = root / "two-cwd"
    two_cwd.mkdir()
    two = _pretrain(two_cwd, "run", recipe_path, processes=2)
    assert two.returncode == 0, two.stderr.decode()[-4000:]
    one = _pretrain(root, root / "one", recipe_path, "train.grad_accum=2")
    assert one.returncode == 0, one.stderr.decode()[-4000:]
    return {"two": two_cwd / "run", "two_cwd": two_cwd, "one": root / "one"}


def _final_state(out) -> dict:
    return torch.load(latest_checkpoint(out / "checkpoints"), weights_only=True)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_finish(runs):
    state = _final_state(runs["two"])
    assert state["step"] == 3
    assert state["world_size"] == 2
    assert json.loads((runs["two"] / "meta.json").read_text())["world_size"] == 2
    assert json.loads((runs["two"] / "summary.json").read_text())["steps"] == 3


@pytest.mark.slow
@pytest.mark.distributed
def test_only_rank_zero_writes(runs):
    # Nothing else appears beside --out (a second rank writing would create its own default run folder or files).
    assert sorted(p.name for p in runs["two_cwd"].iterdir()) == ["run"]
    assert {p.name for p in runs["two"].iterdir()} == RUN_FILES
    steps = [record["step"] for record in map(json.loads, (runs["two"] / "metrics.jsonl").read_text().splitlines()) if "loss" in record]
    assert steps == [1, 2, 3]
    assert (runs["two"] / "log.txt").read_text().count("run ctp-pretrain started") == 1


@pytest.mark.slow
@pytest.mark.distributed
def test_batchnorm_fallback_is_logged(runs):
    log_text = (runs["two"] / "log.txt").read_text()
    assert "keeping per-process BatchNorm statistics on the gloo backend" in log_text
    assert "per-process BatchNorm" not in (runs["one"] / "log.txt").read_text()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_match_accumulated_batch(runs):
    two = _final_state(runs["two"])["model"]
    one = _final_state(runs["one"])["model"]
    parameters = [key for key in one if not key.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(parameters) > 10
    for key in parameters:
        assert torch.allclose(two[key], one[key], rtol=0, atol=1e-6), key
    losses = lambda out: [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]  # noqa: E731
    assert losses(runs["two"]) == pytest.approx(losses(runs["one"]), abs=1e-6)


def test_sync_batchnorm_rejects_cpu_input(tmp_path):
    # A one-process gloo group is enough: torch checks the device before it looks at the world size.
    script = textwrap.dedent(
        f"""
        import torch, torch.distributed as dist
        dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
        layer = torch.nn.SyncBatchNorm(3)
        x = torch.randn(4, 3, 2, 2, 2)
        layer.eval()
        layer(x)
        print("eval ok")
        layer.train()
        try:
            layer(x)
        except ValueError as exc:
            print("train rejected:", exc)
        dist.destroy_process_group()
        """
    )
    result = subprocess.run([sys.executable, "-c", script], env=_environment(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "eval ok" in result.stdout
    assert "train rejected: SyncBatchNorm expected input tensor to be on GPU" in result.stdout


@pytest.mark.parametrize("backend, converted", [("nccl", True), ("gloo", False)])
def test_maybe_sync_batchnorm_by_backend(monkeypatch, caplog, backend, converted):
    import logging

    import torch.distributed as dist

    from mmtk.ctp.backbones import PRETRAIN_STRIDES, BackboneConfig, VideoResNet, maybe_sync_batchnorm

    # Stand in for a two-process group; conversion itself needs no collective.
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    model = VideoResNet(BackboneConfig(arch="r3d", depth=10, widths=[4, 8, 8, 8]), PRETRAIN_STRIDES)
    batchnorms = sum(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())

    with caplog.at_level(logging.INFO, logger="mmtk.ctp.backbones"):
        model = maybe_sync_batchnorm(model)
    synced = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    assert batchnorms > 0
    assert synced == (batchnorms if converted else 0)
    expected = "converting BatchNorm to SyncBatchNorm over 2 processes" if converted else "keeping per-process BatchNorm statistics on the gloo backend"
    assert expected in caplog.text


@pytest.mark.slow
@pytest.mark.distributed
def test_evaluate_with_two_processes(runs, ucf_dataset, tmp_path):
    videos, splits = ucf_dataset
    recipe = {
        "seed": 0,
        "device": "cpu",
        "threads": 1,
        "checkpoint": str(runs["two"] / "backbone.pt"),
        "data": {"layout": "ucf101", "root": str(videos), "splits": str(splits)},
        "view": {"num_frames": 8, "stride": 2, "crop_size": 32, "train_sizes": [[32, 40], [36, 44]], "test_size": [32, 40], "test_clips": 2},
        "finetune": {"train": {"steps": 2, "batch_size": 2, "optimizer": "sgd", "lr": 0.01, "log_every": 1, "checkpoint_every": 0, "progress": False}},
        "probe": {"recall_at": [1, 2], "max_iter": 20},
    }
    recipe_path = tmp_path / "evaluate.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mmtk_commands.main", "ctp-evaluate", str(recipe_path), "--out", "run"]
    result = subprocess.run(command, cwd=tmp_path, env=_environment(), capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr.decode()[-4000:]

    out = tmp_path / "run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evaluate.yaml", "run"]
    summary = json.loads((out / "summary.json").read_text())
    for init in ("pretrained", "random"):
        assert set(summary["results"][init]) == {"finetune", "linear_probe", "retrieval"}
        assert summary["results"][init]["finetune"]["steps"] == 2
        state = _final_state(out / f"finetune-{init}")
        assert state["world_size"] == 2
    assert len(list((out / "results").iterdir())) == 6
    assert (out / "log.txt").read_text().count("run ctp-evaluate started in run\n") == 1  # fine-tuning sub-runs log their own folders
