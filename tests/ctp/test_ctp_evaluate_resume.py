"""ctp-evaluate --resume: interrupted runs continue and match uninterrupted ones exactly."""

from __future__ import annotations

import json
import os
import shutil
import signal
from types import SimpleNamespace

import pytest
import torch
import yaml

import mmtk.ctp.evaluate as evaluate
from mmtk.ctp.backbones import PRETRAIN_STRIDES, BackboneConfig, VideoResNet
from mmtk.ctp.pretrain import save_backbone

RECIPE = {
    "seed": 0,
    "device": "cpu",
    "inits": ["pretrained", "random"],
    "protocols": ["finetune", "linear_probe", "retrieval"],
    "data": {"layout": "ucf101"},
    "view": {"num_frames": 8, "stride": 2, "crop_size": 32, "train_sizes": [[32, 40], [36, 44]], "test_size": [32, 40], "test_clips": 2},
    "finetune": {"train": {"steps": 4, "batch_size": 2, "optimizer": "sgd", "lr": 0.01, "log_every": 1, "checkpoint_every": 0, "progress": False}},
    "probe": {"recall_at": [1, 2], "max_iter": 20},
}


@pytest.fixture(scope="module")
def evaluate_recipe(ucf_dataset, tmp_path_factory):
    """A recipe file for the synthetic data set with a tiny stand-in for a ctp-pretrain backbone.pt."""
    root = tmp_path_factory.mktemp("evaluate-resume")
    config = BackboneConfig(arch="r3d", depth=10, widths=[4, 8, 8, 8])
    torch.manual_seed(1)
    backbone_path = root / "backbone.pt"
    save_backbone(backbone_path, VideoResNet(config, PRETRAIN_STRIDES), SimpleNamespace(backbone=config), step=0)

    videos, splits = ucf_dataset
    recipe = json.loads(json.dumps(RECIPE))
    recipe["checkpoint"] = str(backbone_path)
    recipe["data"].update({"root": str(videos), "splits": str(splits)})
    path = root / "evaluate.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def reference_run(evaluate_recipe, tmp_path_factory):
    """An uninterrupted run: (run folder, summary)."""
    from typer.testing import CliRunner

    from mmtk_commands.main import app

    torch.set_num_threads(1)  # the other runs use one thread too, and float sums depend on the thread count
    out = tmp_path_factory.mktemp("reference") / "run"
    result = CliRunner().invoke(app, ["ctp-evaluate", str(evaluate_recipe), "--out", str(out), "--json", "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout.strip().splitlines()[-1])


def _metrics(summary):
    """Return the results without the run-folder paths, which differ between runs."""
    return {init: {protocol: {k: v for k, v in values.items() if k != "run_dir"} for protocol, values in protocols.items()} for init, protocols in summary["results"].items()}


def _final_weights(out, init):
    checkpoints = sorted((out / f"finetune-{init}" / "checkpoints").glob("ckpt-*.pt"))
    return torch.load(checkpoints[-1], weights_only=True)["model"]


class CallCounter:
    """Wrap a module function and count its calls."""

    def __init__(self, monkeypatch, module, name):
        self.calls = 0
        original = getattr(module, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)


def test_sigterm_during_finetune_resumes_exactly(evaluate_recipe, reference_run, tmp_path, cli, monkeypatch):
    out = tmp_path / "run"
    original_step = evaluate.FinetuneTask.training_step

    def step_with_sigterm(task, model, batch):
        # The random initialisation is fine-tuned last; stop it during its second step.
        if task.state_dict is None and task.global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original_step(task, model, batch)

    monkeypatch.setattr(evaluate.FinetuneTask, "training_step", step_with_sigterm)
    interrupted = cli("ctp-evaluate", evaluate_recipe, "--out", out, "-q")
    assert interrupted.exit_code == 1, interrupted.output
    assert not (out / "summary.json").exists()
    assert (out / "finetune-random" / "checkpoints" / "ckpt-000000002.pt").is_file()
    assert sorted(p.name for p in (out / "results").iterdir()) == [
        "pretrained-finetune.json", "pretrained-linear_probe.json", "pretrained-retrieval.json", "random-linear_probe.json", "random-retrieval.json",
    ]

    monkeypatch.setattr(evaluate.FinetuneTask, "training_step", original_step)
    probes = CallCounter(monkeypatch, evaluate, "fit_logistic_regression")
    forward_passes = CallCounter(monkeypatch, evaluate, "multi_clip_outputs")
    resumed = cli("ctp-evaluate", evaluate_recipe, "--out", out, "--resume", "--json", "-q")
    assert resumed.exit_code == 0, resumed.output
    assert probes.calls == 0
    assert forward_passes.calls == 1  # the test clips of the random fine-tuned model only
    assert json.loads((out / "finetune-random" / "meta.json").read_text())["resumed"] is True
    assert json.loads((out / "finetune-pretrained" / "meta.json").read_text())["resumed"] is False

    reference_out, reference_summary = reference_run
    assert _metrics(json.loads(resumed.stdout.strip().splitlines()[-1])) == _metrics(reference_summary)
    for init in ("pretrained", "random"):
        reference_weights = _final_weights(reference_out, init)
        for key, value in _final_weights(out, init).items():
            assert torch.equal(value, reference_weights[key]), f"{init}: {key}"
    losses = lambda path: [r["loss"] for r in map(json.loads, (path / "finetune-random" / "metrics.jsonl").read_text().splitlines())]  # noqa: E731
    assert losses(out) == losses(reference_out)


def test_crash_in_linear_probe_resumes_exactly(evaluate_recipe, reference_run, tmp_path, cli, monkeypatch):
    out = tmp_path / "run"
    original_fit = evaluate.fit_logistic_regression
    calls = []

    def fit_that_crashes(*args, **kwargs):
        # The first call is the pretrained probe; the second, the random one, fails.
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash in the linear probe")
        return original_fit(*args, **kwargs)

    monkeypatch.setattr(evaluate, "fit_logistic_regression", fit_that_crashes)
    crashed = cli("ctp-evaluate", evaluate_recipe, "--out", out, "-q")
    assert crashed.exit_code == 1, crashed.output
    assert (out / "features-random.h5").is_file()
    assert not (out / "results" / "random-linear_probe.json").exists()
    assert not (out / "finetune-random").exists()

    monkeypatch.setattr(evaluate, "fit_logistic_regression", original_fit)
    forward_passes = CallCounter(monkeypatch, evaluate, "multi_clip_outputs")
    resumed = cli("ctp-evaluate", evaluate_recipe, "--out", out, "--resume", "--json", "-q")
    assert resumed.exit_code == 0, resumed.output
    assert forward_passes.calls == 1  # stored features replace the frozen passes; the random fine-tune is tested once

    _, reference_summary = reference_run
    assert _metrics(json.loads(resumed.stdout.strip().splitlines()[-1])) == _metrics(reference_summary)


def test_resume_of_finished_run_recomputes_nothing(reference_run, evaluate_recipe, tmp_path, cli, monkeypatch):
    reference_out, reference_summary = reference_run
    out = tmp_path / "copy"
    shutil.copytree(reference_out, out)
    probes = CallCounter(monkeypatch, evaluate, "fit_logistic_regression")
    forward_passes = CallCounter(monkeypatch, evaluate, "multi_clip_outputs")
    fits = CallCounter(monkeypatch, evaluate.Trainer, "fit")

    # Dropping a protocol is a resumable change: the others are read back.
    result = cli("ctp-evaluate", evaluate_recipe, "protocols=[finetune,retrieval]", "--out", out, "--resume", "--json", "-q")
    assert result.exit_code == 0, result.output
    assert (probes.calls, forward_passes.calls, fits.calls) == (0, 0, 0)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for init in ("pretrained", "random"):
        assert set(summary["results"][init]) == {"finetune", "retrieval"}
        assert summary["results"][init]["retrieval"] == reference_summary["results"][init]["retrieval"]
        assert summary["results"][init]["finetune"]["top1"] == reference_summary["results"][init]["finetune"]["top1"]


@pytest.mark.parametrize("override, key", [("probe.l2=0.01", "probe.l2"), ("view.test_clips=3", "view.test_clips")])
def test_resume_rejects_changed_key(reference_run, evaluate_recipe, tmp_path, cli, override, key):
    reference_out, _ = reference_run
    out = tmp_path / "copy"
    shutil.copytree(reference_out, out)
    recipe_before = (out / "recipe.yaml").read_text()

    result = cli("ctp-evaluate", evaluate_recipe, override, "--out", out, "--resume")
    assert result.exit_code == 2
    assert key in result.output
    assert (out / "recipe.yaml").read_text() == recipe_before
    assert not (out / "recipe.previous.yaml").exists()


def test_resume_with_more_steps_continues_finetuning(reference_run, evaluate_recipe, tmp_path, cli, monkeypatch):
    reference_out, reference_summary = reference_run
    out = tmp_path / "copy"
    shutil.copytree(reference_out, out)
    probes = CallCounter(monkeypatch, evaluate, "fit_logistic_regression")
    steps = CallCounter(monkeypatch, evaluate.FinetuneTask, "training_step")

    result = cli("ctp-evaluate", evaluate_recipe, "finetune.train.steps=5", "--out", out, "--resume", "--json", "-q")
    assert result.exit_code == 0, result.output
    assert probes.calls == 0
    assert steps.calls == 2  # one more step for each initialisation
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for init in ("pretrained", "random"):
        assert summary["results"][init]["finetune"]["steps"] == 5
        assert summary["results"][init]["linear_probe"] == reference_summary["results"][init]["linear_probe"]
        records = [json.loads(line) for line in (out / f"finetune-{init}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]
