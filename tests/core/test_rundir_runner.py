"""Run folders, checkpoints and the CLI life cycle (exit codes, --json)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from mmtk.core.checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from mmtk.core.errors import DataError, InputError
from mmtk.core.rundir import RunDir
from mmtk.core.runner import RunOptions, run_command, run_tool
from mmtk.core.seeding import capture_rng_state, restore_rng_state


@dataclass
class Tiny:
    seed: int = 0
    device: str = "cpu"
    fail: str = "none"


def _tool(context):
    if context.recipe.fail == "input":
        raise DataError("bad data value 7")
    if context.recipe.fail == "crash":
        raise RuntimeError("boom")
    context.start()
    context.run.log_metrics({"step": 1, "loss": 0.5})
    return {"seed": context.recipe.seed}


def _run(tmp_path, out, *overrides, **options):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("seed: 1\n")
    return run_tool("tiny", Tiny, recipe, list(overrides), RunOptions(out=out, **options), _tool)


def test_run_writes_recipe_meta_metrics_summary(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(tmp_path, out, json=True, seed=5) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["seed"] == 5
    assert (out / "recipe.yaml").read_text().startswith("seed: 5")
    assert json.loads((out / "meta.json").read_text())["tool"] == "tiny"
    assert json.loads((out / "metrics.jsonl").read_text()) == {"step": 1, "loss": 0.5}
    assert json.loads((out / "summary.json").read_text())["run_dir"] == str(out)


def test_existing_run_is_kept_without_resume(tmp_path):
    out = tmp_path / "run"
    assert _run(tmp_path, out) == 0
    before = (out / "summary.json").read_text()
    assert _run(tmp_path, out) == 2
    assert (out / "summary.json").read_text() == before
    assert _run(tmp_path, out, resume=True) == 0


def test_input_error_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    assert _run(tmp_path, out, "fail=input") == 2
    assert not out.exists()
    assert _run(tmp_path, out, "unknown=1") == 2
    assert _run(tmp_path, out, "fail=crash") == 1


def test_failed_run_prints_one_json_error_object(tmp_path, capsys):
    out = tmp_path / "run"

    assert _run(tmp_path, out, "fail=input", json=True) == 2
    error = json.loads(capsys.readouterr().out)
    assert error == {"error": "bad data value 7", "error_type": "DataError", "exit_code": 2}

    assert _run(tmp_path, out, "fail=crash", json=True) == 1
    assert json.loads(capsys.readouterr().out)["exit_code"] == 1


class _DamagedDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        raise DataError(f"item {index} is damaged; delete the cache")


def test_loader_worker_error_keeps_only_its_message(capsys, caplog):
    def body():
        loader = torch.utils.data.DataLoader(_DamagedDataset(), num_workers=1)
        next(iter(loader))

    assert run_command(body, RunOptions(json=True)) == 2
    error = json.loads(capsys.readouterr().out)
    assert error == {"error": "item 0 is damaged; delete the cache", "error_type": "DataError", "exit_code": 2}
    assert "item 0 is damaged; delete the cache" in caplog.text
    assert "Traceback" not in caplog.text


def test_only_rank_zero_prints_json(capsys, monkeypatch):
    options = RunOptions(json=True)
    assert run_command(lambda: {"seed": 1}, options) == 0
    assert json.loads(capsys.readouterr().out) == {"seed": 1}

    monkeypatch.setenv("RANK", "1")
    assert run_command(lambda: {"seed": 1}, options) == 0
    assert capsys.readouterr().out == ""


def test_used_folder_error_suggests_resume_only_when_supported(tmp_path):
    RunDir(tmp_path / "run", "tiny").start({"seed": 1})

    with pytest.raises(InputError, match="Pass --resume"):
        RunDir(tmp_path / "run", "tiny")
    with pytest.raises(InputError) as error:
        RunDir(tmp_path / "run", "tiny", can_resume=False)
    assert "--resume" not in str(error.value)


def test_foreign_nonempty_folder_rejected(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not an mmtk run folder"):
        RunDir(tmp_path / "mine", "tiny")


def test_checkpoint_roundtrip_and_tool_check(tmp_path):
    path = checkpoint_path(tmp_path, 20)
    save_checkpoint(path, {"tool": "tiny", "step": 20, "w": torch.ones(2)})
    save_checkpoint(checkpoint_path(tmp_path, 10), {"tool": "tiny", "step": 10})
    assert latest_checkpoint(tmp_path) == path
    assert load_checkpoint(path, expected_tool="tiny")["step"] == 20
    with pytest.raises(InputError, match="written by 'tiny', not by 'other'"):
        load_checkpoint(path, expected_tool="other")
    prune_checkpoints(tmp_path, keep=1)
    assert latest_checkpoint(tmp_path) == path
    assert len(list(tmp_path.glob("ckpt-*.pt"))) == 1


def test_corrupt_checkpoint_is_input_error(tmp_path):
    path = tmp_path / "ckpt-000000001.pt"
    path.write_bytes(b"not a zip")
    with pytest.raises(InputError) as error:
        load_checkpoint(path)
    assert "is not a readable PyTorch checkpoint" in str(error.value)
    assert "starts like neither a torch archive nor a pickle" in str(error.value)


def test_truncated_checkpoint_message_ends_at_sentence(tmp_path):
    path = tmp_path / "ckpt-000000001.pt"
    save_checkpoint(path, {"tool": "tiny", "weights": torch.zeros(1000)})
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(InputError) as error:
        load_checkpoint(path, expected_tool="tiny")
    assert "corrupt, truncated or another kind of file: RuntimeError: PytorchStreamReader failed" in str(error.value)
    assert str(error.value).endswith("); pass a checkpoint of tiny.")


def test_pickled_object_checkpoint_message_is_safe(tmp_path):
    import pickle

    path = tmp_path / "model.pt"
    with open(path, "wb") as handle:
        pickle.dump({"weights": object}, handle)

    with pytest.raises(InputError) as error:
        load_checkpoint(path, expected_tool="tiny")
    assert "Python objects other than tensors" in str(error.value)
    assert "weights_only" not in str(error.value)


def test_folder_and_toolless_checkpoints_named(tmp_path):
    with pytest.raises(InputError, match="is a folder; pass the checkpoint file inside it"):
        load_checkpoint(tmp_path, expected_tool="tiny")

    path = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(InputError, match="names no mmtk tool that wrote it"):
        load_checkpoint(path, expected_tool="tiny")


def test_rng_state_roundtrip_through_safe_load(tmp_path):
    import random

    import numpy as np

    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_written_files_are_world_readable(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        from mmtk.core import io

        io.write_text(tmp_path / "result.txt", "x")
    finally:
        os.umask(mask)
    assert (tmp_path / "result.txt").stat().st_mode & 0o777 == 0o644


def test_default_run_paths_differ_within_a_second():
    from mmtk.core.rundir import default_run_path

    paths = {default_run_path("tiny") for _ in range(20)}
    assert len(paths) == 20


def test_out_below_a_file_is_input_error(tmp_path):
    (tmp_path / "afile").write_text("keep")
    with pytest.raises(InputError, match="is a file, not a folder"):
        RunDir(tmp_path / "afile" / "sub", "tiny")


def test_unexpected_error_reaches_log_file(tmp_path):
    out = tmp_path / "run"

    def crash_after_start(context):
        context.start()
        raise RuntimeError("boom after start")

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("seed: 1\n")
    assert run_tool("tiny", Tiny, recipe, [], RunOptions(out=out), crash_after_start) == 1
    assert "boom after start" in (out / "log.txt").read_text()


def test_sigterm_outside_training_exits_1(tmp_path):
    import os
    import signal

    def terminate(context):
        context.start()
        os.kill(os.getpid(), signal.SIGTERM)
        return {}

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("seed: 1\n")
    previous = signal.getsignal(signal.SIGTERM)
    assert run_tool("tiny", Tiny, recipe, [], RunOptions(out=tmp_path / "run"), terminate) == 1
    assert signal.getsignal(signal.SIGTERM) is previous
    assert "received SIGTERM" in (tmp_path / "run" / "log.txt").read_text()


def test_sigterm_not_swallowed_by_except_exception(tmp_path):
    import os
    import signal

    def swallow_errors(context):
        context.start()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except Exception:  # noqa: BLE001 - what an optional-import guard in a library does
            pass
        return {"finished": True}

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("seed: 1\n")
    assert run_tool("tiny", Tiny, recipe, [], RunOptions(out=tmp_path / "run"), swallow_errors) == 1
    assert not (tmp_path / "run" / "summary.json").exists()


def test_negative_seed_and_absent_cuda_exit_2(tmp_path):
    out = tmp_path / "run"
    assert _run(tmp_path, out, seed=-1) == 2
    if not torch.cuda.is_available():
        assert _run(tmp_path, out, device="cuda") == 2
    assert not out.exists()


def test_resume_rejects_changed_recipe(tmp_path):
    out = tmp_path / "run"
    assert _run(tmp_path, out) == 0
    before = (out / "recipe.yaml").read_text()
    assert _run(tmp_path, out, "fail=none", seed=9, resume=True) == 2
    assert (out / "recipe.yaml").read_text() == before


def test_resume_accepts_changed_run_length():
    from mmtk.core.rundir import RESUMABLE_KEYS, changed_keys

    changed = changed_keys({"train": {"steps": 10, "lr": 1.0}, "seed": 1}, {"train": {"steps": 20, "lr": 1.0}, "seed": 1})
    assert changed == ["train.steps"]
    assert "steps" in RESUMABLE_KEYS
