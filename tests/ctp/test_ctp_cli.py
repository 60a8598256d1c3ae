"""The ctp-pretrain and ctp-evaluate commands on synthetic videos: outputs, resume and bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

TINY_PRETRAIN = {
    "seed": 0,
    "device": "cpu",
    "data": {"layout": "folder"},
    "clips": {"num_frames": 8, "strides": [1, 2], "crop_size": 32, "short_sides": [32, 36], "clips_per_video": 4, "holdout_fraction": 0.34, "eval_clips": 2},
    "proxy": {"scales": [6, 8, 10]},
    "backbone": {"arch": "r3d", "depth": 10, "widths": [4, 8, 8, 8]},
    "head_hidden": 16,
    "train": {"steps": 4, "batch_size": 2, "optimizer": "adamw", "lr": 0.001, "schedule": "constant", "log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 5, "progress": False},
}


def write_recipe(path, recipe, **data):
    recipe = json.loads(json.dumps(recipe))
    recipe["data"].update({k: str(v) for k, v in data.items()})
    path.write_text(yaml.safe_dump(recipe))
    return path


def invoke(*args):
    from typer.testing import CliRunner

    from mmtk_commands.main import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def pretrained_run(video_folder, tmp_path_factory):
    torch.set_num_threads(1)  # the resume test reruns with one thread, and float sums depend on the thread count
    root = tmp_path_factory.mktemp("pretrain")
    recipe = write_recipe(root / "tiny.yaml", TINY_PRETRAIN, root=video_folder)
    out = root / "run"
    result = invoke("ctp-pretrain", recipe, "--out", out, "--json", "-q")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout.strip().splitlines()[-1]), recipe


def test_pretrain_writes_outputs(pretrained_run):
    out, summary, _ = pretrained_run
    for name in ("backbone.pt", "tracks.gif", "tracks.png", "metrics.jsonl", "summary.json", "clip-cache.h5"):
        assert (out / name).is_file(), name
    assert summary["steps"] == 4
    assert 0.0 <= summary["heldout_iou"] <= 1.0
    assert 0.0 < summary["heldout_baseline_iou"] <= 1.0
    state = torch.load(out / "backbone.pt", weights_only=True)
    assert state["tool"] == "ctp-pretrain"
    assert state["backbone"]["widths"] == [4, 8, 8, 8]


def test_pretrain_resume_is_exact(pretrained_run, tmp_path, cli):
    out, _, recipe = pretrained_run
    interrupted = tmp_path / "interrupted"
    assert cli("ctp-pretrain", recipe, "train.steps=2", "--out", interrupted, "-q").exit_code == 0
    result = cli("ctp-pretrain", recipe, "--out", interrupted, "--resume", "-q")
    assert result.exit_code == 0, result.output

    straight = torch.load(out / "backbone.pt", weights_only=True)["state_dict"]
    resumed = torch.load(interrupted / "backbone.pt", weights_only=True)["state_dict"]
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    losses = lambda path: [r["loss"] for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]  # noqa: E731
    assert losses(interrupted) == losses(out)


def test_pretrain_rejects_unreadable_video(tmp_path, cli, video_folder):
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "good.mp4").write_bytes((video_folder / "clip0.mp4").read_bytes())
    (folder / "broken.mp4").write_bytes(os.urandom(4000))
    out = tmp_path / "run"
    result = cli("ctp-pretrain", write_recipe(tmp_path / "r.yaml", TINY_PRETRAIN, root=folder), "--out", out)
    assert result.exit_code == 2
    assert "broken.mp4" in result.output
    assert not out.exists()


def test_pretrain_rejects_clip_longer_than_video(tmp_path, cli, video_folder):
    out = tmp_path / "run"
    result = cli("ctp-pretrain", write_recipe(tmp_path / "r.yaml", TINY_PRETRAIN, root=video_folder), "clips.num_frames=30", "--out", out)
    assert result.exit_code == 2
    assert "fewer than the 30" in result.output
    assert not out.exists()


def test_pretrain_rejects_split_list_naming_missing_file(tmp_path, cli, ucf_dataset):
    root, splits = ucf_dataset
    bad = tmp_path / "splits"
    bad.mkdir()
    (bad / "classInd.txt").write_text((splits / "classInd.txt").read_text())
    (bad / "trainlist01.txt").write_text("Drift/v_Drift_g00.mp4 1\nDrift/v_gone.mp4 1\n")
    (bad / "testlist01.txt").write_text("Drift/v_Drift_g02.mp4\n")
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", TINY_PRETRAIN, root=root, layout="ucf101", splits=bad)
    result = cli("ctp-pretrain", recipe, "--out", out)
    assert result.exit_code == 2
    assert "v_gone.mp4" in result.output
    assert not out.exists()


TINY_EVALUATE = {
    "seed": 0,
    "device": "cpu",
    "inits": ["pretrained", "random"],
    "data": {"layout": "ucf101"},
    "view": {"num_frames": 8, "stride": 2, "crop_size": 32, "train_sizes": [[32, 40], [36, 44]], "test_size": [32, 40], "test_clips": 2},
    "finetune": {"train": {"steps": 2, "batch_size": 2, "optimizer": "sgd", "lr": 0.01, "log_every": 1, "checkpoint_every": 0, "progress": False}},
    "probe": {"recall_at": [1, 2], "max_iter": 20},
}


def test_evaluate_reports_every_protocol(pretrained_run, ucf_dataset, tmp_path, cli):
    out, _, _ = pretrained_run
    root, splits = ucf_dataset
    recipe = write_recipe(tmp_path / "e.yaml", TINY_EVALUATE, root=root, splits=splits)
    result = cli("ctp-evaluate", recipe, f"checkpoint={out / 'backbone.pt'}", "--out", tmp_path / "eval", "--json", "-q")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["classes"] == 2
    assert (summary["train_videos"], summary["test_videos"]) == (4, 2)
    for init in ("pretrained", "random"):
        metrics = summary["results"][init]
        assert set(metrics) == {"finetune", "linear_probe", "retrieval"}
        assert metrics["finetune"]["top1"] in (0.0, 0.5, 1.0)
        assert metrics["finetune"]["top5"] == 1.0  # k >= number of classes
        assert metrics["retrieval"]["R@2"] >= metrics["retrieval"]["R@1"]


def test_evaluate_rejects_checkpoint_of_other_tool(tmp_path, cli, ucf_dataset, pretrained_run):
    out, _, _ = pretrained_run
    root, splits = ucf_dataset
    trainer_checkpoint = sorted((out / "checkpoints").glob("*.pt"))[-1]
    recipe = write_recipe(tmp_path / "e.yaml", TINY_EVALUATE, root=root, splits=splits)
    result = cli("ctp-evaluate", recipe, f"checkpoint={trainer_checkpoint}", "--out", tmp_path / "eval")
    assert result.exit_code == 2
    assert "backbone.pt" in result.output
    assert not (tmp_path / "eval").exists()


def test_evaluate_needs_checkpoint_for_pretrained(tmp_path, cli, ucf_dataset):
    root, splits = ucf_dataset
    recipe = write_recipe(tmp_path / "e.yaml", TINY_EVALUATE, root=root, splits=splits)
    result = cli("ctp-evaluate", recipe, "--out", tmp_path / "eval")
    assert result.exit_code == 2
    assert "checkpoint" in result.output


