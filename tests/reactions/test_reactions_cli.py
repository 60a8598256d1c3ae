"""The discover-reactions and simulate-reactions commands: recovery, bad input, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from mmtk.reactions.data import SCHEMA
from mmtk.reactions.mechanism import load_mechanism


# A cheap run for resume tests; whether it converges does not matter.
SHORT = ["train.epochs=12000", "train.freeze.check_every=2000", "train.freeze.stall_lag=200", "train.log_every=1000", "train.checkpoint_every=4000", "data.simulation.experiments=10"]


def _summary(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_michaelis_menten_recovered(cli, tmp_path):
    out = tmp_path / "mm"
    # The small recipe: 30 experiments, checks every 5,000 epochs, seed 3.
    summary = _summary(cli("discover-reactions", "small", "--out", out, "--json", "-q"))
    comparison = summary["comparison"]
    assert comparison["stoichiometry_match"]
    assert comparison["canonical_matrix_equal"]
    assert comparison["max_rate_relative_error"] < 1e-6
    catalysis = next(row for row in comparison["reactions"] if row["k_reverse_true"] == 0)
    assert catalysis["k_reverse_to_k_forward"] < 1e-6
    assert summary["structure_converged"]
    assert summary["restarts"][0]["frozen_epoch"] is not None
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"

    # The written mechanism simulates again and matches the truth.
    found = load_mechanism(str(out / "mechanism.yaml"))
    truth = load_mechanism("michaelis-menten")
    c = np.random.default_rng(0).uniform(0, 1, size=(20, 4))
    np.testing.assert_allclose(found.rhs(c), truth.rhs(c), rtol=1e-5, atol=1e-6)


def test_linear_chain_recovered(cli, tmp_path):
    # The bundled recipe as shipped (seed 1); W froze near epoch 90,000 when measured.
    summary = _summary(cli("discover-reactions", "linear-chain", "--out", tmp_path / "chain", "--json", "-q"))
    assert summary["structure_converged"]
    comparison = summary["comparison"]
    assert comparison["stoichiometry_match"]
    assert comparison["canonical_matrix_equal"]
    assert not comparison["unmatched_found"]
    assert comparison["max_rate_relative_error"] < 1e-3
    found = {row["equation"]: (row["k_forward"], row["k_reverse"]) for row in summary["mechanism"]}
    assert set(found) == {"x2 <=> x3", "x1 <=> x2"}
    np.testing.assert_allclose(found["x1 <=> x2"], [1.0, 1.0], rtol=1e-3)
    np.testing.assert_allclose(found["x2 <=> x3"], [1e3, 1e3], rtol=1e-3)


def test_adam_rate_fit_after_freeze(cli, tmp_path):
    summary = _summary(cli("discover-reactions", "small", "rate_fit.method=adam", "train.epochs=110000", "--out", tmp_path / "run", "--json", "-q"))
    restart = summary["restarts"][0]
    assert restart["rate_fit"] == {"method": "adam"}
    assert restart["frozen_epoch"] is not None
    assert restart["epochs_run"] == 110000, "Adam keeps training the rates after the freeze"
    assert summary["comparison"]["stoichiometry_match"]
    assert summary["comparison"]["max_rate_relative_error"] < 1e-4


def test_simulate_reactions_writes_schema(cli, tmp_path):
    out = tmp_path / "sim"
    summary = _summary(cli("simulate-reactions", "michaelis-menten", "simulation.experiments=3", "simulation.points=5", "--out", out, "--json", "-q"))
    assert summary["experiments"] == 3
    assert summary["times"] == 5
    with h5py.File(out / "trajectories.h5") as handle:
        assert handle.attrs["mmtk_schema"] == SCHEMA
        c = handle["concentrations"][()]
        dcdt = handle["dcdt"][()]
        assert c.shape == (3, 5, 4)
    np.testing.assert_allclose(dcdt, load_mechanism("michaelis-menten").rhs(c), rtol=1e-13)


def test_simulate_metrics_and_resume(cli, tmp_path, caplog):
    out = tmp_path / "sim"
    command = ["simulate-reactions", "michaelis-menten", "simulation.experiments=3", "simulation.points=5", "--out", out, "--json"]
    first = _summary(cli(*command, "--device", "cpu", "-v"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["experiment"] for r in records] == [0, 1, 2]
    assert all(r["nfev"] > 0 for r in records)
    with h5py.File(out / "trajectories.h5") as handle:
        np.testing.assert_array_equal([r["c0"] for r in records], handle["concentrations"][:, 0, :])
    assert "experiment 2: Radau from c0=" in caplog.text, "-v logs the solver statistics per experiment"

    # Resuming a finished run reuses its output and adds no metrics.
    before = (out / "trajectories.h5").read_bytes()
    resumed = _summary(cli(*command, "--resume", "-q"))
    assert resumed == first
    assert (out / "trajectories.h5").read_bytes() == before
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3

    # A run stopped before its summary simulates again, to the same data.
    (out / "summary.json").unlink()
    again = _summary(cli(*command, "--resume", "-q"))
    assert again == first
    with h5py.File(out / "trajectories.h5") as handle:
        np.testing.assert_array_equal([r["c0"] for r in records], handle["concentrations"][:, 0, :])
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("device", ["meta", "no-such-device"])
def test_simulate_rejects_non_cpu_device(cli, tmp_path, caplog, device):
    out = tmp_path / "sim"
    result = cli("simulate-reactions", "michaelis-menten", "--device", device, "--out", out)
    assert result.exit_code == 2
    assert repr(device) in result.output + caplog.text
    assert not out.exists()


def test_unknown_arrow_exits_2(cli, tmp_path, caplog):
    mechanism = tmp_path / "arrow.yaml"
    mechanism.write_text('species: [A, B]\nreactions:\n  - {equation: "A => B", k_forward: 2.0}\n')
    out = tmp_path / "sim"
    result = cli("simulate-reactions", "michaelis-menten", f"mechanism={mechanism}", "--out", out)
    assert result.exit_code == 2
    assert "'A => B'" in result.output + caplog.text
    assert "'<=>' (reversible) and '->' (irreversible)" in result.output + caplog.text
    assert not out.exists()


def test_discover_reads_simulated_file(cli, tmp_path):
    sim = tmp_path / "sim"
    _summary(cli("simulate-reactions", "michaelis-menten", "simulation.experiments=5", "--out", sim, "--json", "-q"))
    summary = _summary(cli("discover-reactions", "michaelis-menten", *SHORT[:1], "data.source=file", f"data.file={sim / 'trajectories.h5'}", "data.truth=michaelis-menten", "--out", tmp_path / "run", "--json", "-q"))
    assert summary["data"]["dcdt"] == "exact"
    assert summary["data"]["train_samples"] == 40


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.reactons=3"], "Did you mean 'reactions'"),
        (["train.lr=-1"], "train.lr"),
        (["train.backend=numpy", "device=meta"], "CPU only"),
        (["data.source=file"], "data.file is not set"),
        (["data.mechanism=no-such-mechanism"], "mechanism not found"),
        (["train.freeze.partial_tolerance=0.7"], "partial_tolerance"),
    ],
)
def test_recipe_errors_exit_2(cli, tmp_path, caplog, overrides, message):
    out = tmp_path / "run"
    result = cli("discover-reactions", "michaelis-menten", *overrides, "--out", out)
    assert result.exit_code == 2
    assert message in result.output + caplog.text
    assert not out.exists()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _truncated_h5(tmp_path: Path) -> Path:
    full = tmp_path / "full.h5"
    with h5py.File(full, "w") as handle:
        handle.create_dataset("species", data=["E", "S", "ES", "P"])
        handle.create_dataset("time", data=np.zeros((50, 10)))
        handle.create_dataset("concentrations", data=np.random.default_rng(0).uniform(size=(50, 10, 4)))
    data = full.read_bytes()
    return _write_bytes(tmp_path / "truncated.h5", data[: len(data) // 2])


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD_DATA = {
    "nan": (lambda d: _write(d / "nan.csv", "time,E,S,ES,P\n0,1,1,0,0\n0.5,nan,1,0,0\n1,1,1,0,0\n"), "NaN"),
    "negative": (lambda d: _write(d / "neg.csv", "time,E,S,ES,P\n0,1,1,0,0\n0.5,1,-0.2,0,0\n1,1,1,0,0\n"), "negative concentration -0.2 of S"),
    "species": (lambda d: _write(d / "names.csv", "time,E,S,X,P\n0,1,1,0,0\n0.5,1,1,0,0\n1,1,1,0,0\n"), "missing: ['ES']"),
    "empty": (lambda d: _write(d / "empty.h5", ""), "is empty"),
    "truncated": (_truncated_h5, "truncated"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_exit_2_without_output(cli, tmp_path, caplog, case):
    make, message = BAD_DATA[case]
    path = make(tmp_path)
    out = tmp_path / "run"
    result = cli("discover-reactions", "michaelis-menten", "data.source=file", f"data.file={path}", "data.truth=michaelis-menten", "data.derivative.method=finite_difference", "--out", out)
    assert result.exit_code == 2
    assert message in result.output + caplog.text
    assert not out.exists()


def test_existing_results_not_overwritten(cli, tmp_path):
    out = tmp_path / "run"
    _summary(cli("discover-reactions", "michaelis-menten", *SHORT, "--out", out, "--json", "-q"))
    before = (out / "mechanism.yaml").read_text()
    bad = _write(tmp_path / "nan.csv", "time,E,S,ES,P\n0,1,1,0,0\n0.5,nan,1,0,0\n1,1,1,0,0\n")
    assert cli("discover-reactions", "michaelis-menten", "data.source=file", f"data.file={bad}", "--out", out, "--resume").exit_code == 2
    assert (out / "mechanism.yaml").read_text() == before


class _StopAfterPolls:
    """Stand-in for StopFlag that turns on after a fixed number of polls."""

    limit = 5000

    def __init__(self) -> None:
        self.polls = 0
        self.signal_name = "SIGTERM"

    @property
    def requested(self) -> bool:
        self.polls += 1
        return self.polls > self.limit

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def _result_of(out: Path) -> tuple[dict, list]:
    summary = json.loads((out / "summary.json").read_text())
    mechanism = yaml.safe_load((out / "mechanism.yaml").read_text())
    return mechanism, [(r["train_mse"], r["epochs_run"], r["events"]) for r in summary["restarts"]]


def test_interrupted_run_resumes_to_same_result(cli, tmp_path, monkeypatch):
    overrides = [*SHORT, "train.restarts=2"]
    _summary(cli("discover-reactions", "michaelis-menten", *overrides, "--out", tmp_path / "whole", "--json", "-q"))

    import mmtk.reactions.tool as tool

    stopped = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        patch.setattr(tool, "StopFlag", _StopAfterPolls)
        result = cli("discover-reactions", "michaelis-menten", *overrides, "--out", stopped, "-q")
    assert result.exit_code == 1
    assert list((stopped / "checkpoints").glob("ckpt-*.pt"))
    assert not (stopped / "summary.json").exists()

    _summary(cli("discover-reactions", "michaelis-menten", *overrides, "--out", stopped, "--resume", "--json", "-q"))
    assert _result_of(stopped) == _result_of(tmp_path / "whole")
    steps = [json.loads(line)["step"] for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "metrics after the checkpoint are not repeated"


class _StopInSecondRestart(_StopAfterPolls):
    """Stand-in for StopFlag that turns on a few polls after the first restart has finished."""

    finished_restarts = 0

    @property
    def requested(self) -> bool:
        if _StopInSecondRestart.finished_restarts == 0:
            return False
        self.polls += 1
        return self.polls > 3


def _checkpoint_positions(out: Path, epochs: int) -> list[tuple[int, int, int]]:
    """Return (step in the name, restart, epoch) of each checkpoint in ``out``, oldest first."""
    from mmtk.core.checkpoint import load_checkpoint

    positions = []
    for path in sorted((out / "checkpoints").glob("ckpt-*.pt")):
        state = load_checkpoint(path, expected_tool="discover-reactions")
        positions.append((int(path.stem.split("-")[1]), state["restart"], state["epoch"]))
    for step, restart, epoch in positions:
        assert step == restart * epochs + epoch, f"ckpt-{step} holds restart {restart}, epoch {epoch}"
    return positions


def test_resume_after_finished_restart(cli, tmp_path, monkeypatch):
    overrides = [*SHORT, "train.restarts=2"]
    whole = _summary(cli("discover-reactions", "michaelis-menten", *overrides, "--out", tmp_path / "whole", "--json", "-q"))
    # The last checkpoint is named after the final epoch count of the last restart.
    assert _checkpoint_positions(tmp_path / "whole", 12000)[-1][1:] == (1, whole["restarts"][1]["epochs_run"])

    import mmtk.reactions.tool as tool

    original_finish = tool.finish_restart

    def counting_finish(*args, **kwargs):
        _StopInSecondRestart.finished_restarts += 1
        return original_finish(*args, **kwargs)

    stopped = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        patch.setattr(_StopInSecondRestart, "finished_restarts", 0)
        patch.setattr(tool, "StopFlag", _StopInSecondRestart)
        patch.setattr(tool, "finish_restart", counting_finish)
        result = cli("discover-reactions", "michaelis-menten", *overrides, "--out", stopped, "-q")
        finished_before_stop = _StopInSecondRestart.finished_restarts
    assert result.exit_code == 1
    assert finished_before_stop == 1, "the stop must come while restart 1 runs"
    assert _checkpoint_positions(stopped, 12000)[-1][1] == 1
    assert not (stopped / "summary.json").exists()

    # The resumed run restores restart 0's result and loss history from the checkpoint.
    _summary(cli("discover-reactions", "michaelis-menten", *overrides, "--out", stopped, "--resume", "--json", "-q"))
    assert _result_of(stopped) == _result_of(tmp_path / "whole")
    assert (stopped / "loss.png").read_bytes()[:4] == b"\x89PNG"

    # Resuming a completed run reports the same result again.
    _summary(cli("discover-reactions", "michaelis-menten", *overrides, "--out", stopped, "--resume", "--json", "-q"))
    assert _result_of(stopped) == _result_of(tmp_path / "whole")


def test_sigterm_saves_checkpoint_and_resumes(tmp_path):
    overrides = [*SHORT, "train.epochs=40000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mmtk_commands.main", "discover-reactions", "michaelis-menten", *overrides, "-q"]
    whole = tmp_path / "whole"
    stopped = tmp_path / "stopped"

    process = subprocess.Popen([*command, "--out", str(stopped)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (stopped / "metrics.jsonl").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr.decode()
    assert list((stopped / "checkpoints").glob("ckpt-*.pt")), "SIGTERM must leave a checkpoint"

    resumed = subprocess.run([*command, "--out", str(stopped), "--resume"], env=env, capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()
    uninterrupted = subprocess.run([*command, "--out", str(whole)], env=env, capture_output=True, timeout=300)
    assert uninterrupted.returncode == 0, uninterrupted.stderr.decode()
    assert _result_of(stopped) == _result_of(whole)


def test_device_option_errors_exit_2(cli, tmp_path, caplog):
    import torch

    out = tmp_path / "run"
    # meta is a valid non-CPU device on every machine, so the backend check is reached.
    result = cli("discover-reactions", "michaelis-menten", "train.backend=numpy", "--device", "meta", "--out", out)
    assert result.exit_code == 2
    assert "CPU only" in result.output + caplog.text
    if not torch.cuda.is_available():
        result = cli("discover-reactions", "michaelis-menten", "--device", "cuda", "--out", out)
        assert result.exit_code == 2
        assert "CUDA is not available" in result.output + caplog.text
    assert not out.exists()


def test_bundled_recipes_validate():
    from mmtk.core.recipe import list_bundled_recipes, load_recipe
    from mmtk.reactions.mechanism import bundled_mechanisms
    from mmtk.reactions.recipe import DiscoverRecipe, SimulateRecipe

    listing = list_bundled_recipes()
    assert {"hydrogen-oxidation", "hydrogen-oxidation-paper", "michaelis-menten", "linear-chain", "small"} <= set(listing["discover-reactions"])
    for name in listing["discover-reactions"]:
        recipe = load_recipe(DiscoverRecipe, name, tool="discover-reactions")
        assert recipe.data.mechanism in bundled_mechanisms()
    for name in listing["simulate-reactions"]:
        assert load_recipe(SimulateRecipe, name, tool="simulate-reactions").mechanism == name
    hydrogen = load_recipe(DiscoverRecipe, "hydrogen-oxidation", tool="discover-reactions")
    assert hydrogen.train.freeze.check_every == 10_000
    assert hydrogen.train.freeze.stall_lag == 1_000
    assert hydrogen.train.lr == 1e-3
