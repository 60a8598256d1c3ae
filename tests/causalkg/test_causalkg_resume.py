"""build-causal-kg --resume: stored bootstrap resamples are reused and the result equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal

import numpy as np
import pytest

import mmtk.causalkg.structure as structure
from mmtk.causalkg.effects import bootstrap_effects, quiet_pgmpy
from mmtk.causalkg.resamples import ResampleStore, fingerprint
from mmtk.causalkg.simulate import ARITHMETIC_EDGES, ARITHMETIC_SKILLS, sample_profiles
from mmtk.causalkg.structure import StructureSettings, bootstrap_structures

BUILD = ["data.simulated_students=600", "bootstrap.resamples=8"]


def _build(out, *overrides, resume=False):
    from typer.testing import CliRunner

    from mmtk_commands.main import app

    args = ["build-causal-kg", "simulated", *BUILD, *overrides, "--out", str(out), "-q"] + (["--resume"] if resume else [])
    return CliRunner().invoke(app, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted build in one process."""
    out = tmp_path_factory.mktemp("kg-reference") / "run"
    result = _build(out, "bootstrap.workers=1")
    assert result.exit_code == 0, result.output
    return out


def _results(out):
    """Return the files that describe the network, and the summary, without paths and worker counts."""
    summary = json.loads((out / "summary.json").read_text())
    summary = {key: value for key, value in summary.items() if key not in ("run_dir", "files", "workers")}
    network = json.loads((out / "network.json").read_text())
    del network["settings"]["bootstrap"]["workers"]
    return network, json.loads((out / "bootstrap.json").read_text()), summary


def _stored(out, kind):
    return json.loads((out / "resamples" / f"{kind}.json").read_text())["results"]


class AddCounter:
    """Count ResampleStore.add calls per kind of resample."""

    def __init__(self, monkeypatch):
        self.counts = {"structure": 0, "effect": 0}
        original = ResampleStore.add

        def counted(store, resample, result):
            self.counts[store.kind] += 1
            original(store, resample, result)

        monkeypatch.setattr(ResampleStore, "add", counted)


def test_sigterm_during_structure_bootstrap(reference_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    original_learn = structure._learn_resample

    def learn_until_sigterm(resample):
        if resample == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return original_learn(resample)

    monkeypatch.setattr(structure, "_learn_resample", learn_until_sigterm)
    interrupted = _build(out, "bootstrap.workers=1")
    assert interrupted.exit_code == 1
    assert not (out / "summary.json").exists()
    assert sorted(map(int, _stored(out, "structures"))) == [0, 1, 2, 3, 4]
    assert not (out / "resamples" / "effects.json").exists()

    monkeypatch.setattr(structure, "_learn_resample", original_learn)
    adds = AddCounter(monkeypatch)
    resumed = _build(out, "bootstrap.workers=1", resume=True)
    assert resumed.exit_code == 0, resumed.output
    assert adds.counts == {"structure": 3, "effect": 8}
    assert _results(out) == _results(reference_run)


def test_interrupt_during_parallel_effects(reference_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    original_add = ResampleStore.add

    def add_until_sigterm(store, resample, result):
        original_add(store, resample, result)
        if store.kind == "effect" and len(store.results) == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ResampleStore, "add", add_until_sigterm)
    interrupted = _build(out, "bootstrap.workers=2")
    assert interrupted.exit_code == 1
    assert len(_stored(out, "structures")) == 8
    assert sorted(map(int, _stored(out, "effects"))) == [0, 1, 2]

    monkeypatch.setattr(ResampleStore, "add", original_add)
    adds = AddCounter(monkeypatch)
    resumed = _build(out, "bootstrap.workers=2", resume=True)
    assert resumed.exit_code == 0, resumed.output
    assert adds.counts == {"structure": 0, "effect": 5}
    assert _results(out) == _results(reference_run)


def test_resume_rejects_changed_key(reference_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reference_run, out)
    recipe_before = (out / "recipe.yaml").read_text()
    result = _build(out, "bootstrap.workers=1", "structure.score=bdeu", resume=True)
    assert result.exit_code == 2
    assert "structure.score" in result.output
    assert (out / "recipe.yaml").read_text() == recipe_before
    assert _results(out) == _results(reference_run)


@pytest.fixture(scope="module")
def profiles():
    quiet_pgmpy()
    return sample_profiles(ARITHMETIC_SKILLS, ARITHMETIC_EDGES, 400, np.random.default_rng(3))


def test_more_resamples_extend_the_store(profiles, tmp_path):
    settings = StructureSettings()
    key = fingerprint(profiles, ARITHMETIC_SKILLS, 7, settings)
    first = ResampleStore(tmp_path / "s.json", "structure", key)
    bootstrap_structures(profiles, ARITHMETIC_SKILLS, settings, 3, 7, 1, store=first)
    assert sorted(json.loads((tmp_path / "s.json").read_text())["results"]) == ["0", "1", "2"]

    extended = ResampleStore(tmp_path / "s.json", "structure", key, load=True)
    assert extended.missing(5) == [3, 4]
    resumed = bootstrap_structures(profiles, ARITHMETIC_SKILLS, settings, 5, 7, 1, store=extended)
    straight = bootstrap_structures(profiles, ARITHMETIC_SKILLS, settings, 5, 7, 1)
    assert resumed.directed_counts == straight.directed_counts
    assert len(extended.results) == 5


def test_stored_effects_equal_recomputed(profiles, tmp_path):
    edges = [("number_sense", "addition"), ("addition", "subtraction")]
    key = fingerprint(profiles, ARITHMETIC_SKILLS, 7, {"edges": edges, "equivalent_sample_size": 5.0})
    bootstrap_effects(profiles, ARITHMETIC_SKILLS, edges, 2, 7, 1, store=ResampleStore(tmp_path / "e.json", "effect", key))
    store = ResampleStore(tmp_path / "e.json", "effect", key, load=True)
    resumed = bootstrap_effects(profiles, ARITHMETIC_SKILLS, edges, 4, 7, 1, store=store)
    straight = bootstrap_effects(profiles, ARITHMETIC_SKILLS, edges, 4, 7, 1)
    assert resumed.shape == (4, 2)
    assert np.array_equal(resumed, straight)


def test_store_ignores_other_inputs(profiles, tmp_path):
    path = tmp_path / "s.json"
    settings = StructureSettings()
    key = fingerprint(profiles, ARITHMETIC_SKILLS, 7, settings)
    store = ResampleStore(path, "structure", key)
    store.add(0, [["addition", "subtraction"]])
    store.save()
    assert ResampleStore(path, "structure", key, load=True).results == {0: [["addition", "subtraction"]]}

    changed_data = profiles.copy()
    changed_data[0, 0] = 1 - changed_data[0, 0]
    for other in (
        fingerprint(changed_data, ARITHMETIC_SKILLS, 7, settings),
        fingerprint(profiles, ARITHMETIC_SKILLS, 8, settings),
        fingerprint(profiles, ARITHMETIC_SKILLS, 7, StructureSettings(score="bdeu")),
    ):
        assert other != key
        assert ResampleStore(path, "structure", other, load=True).results == {}
    assert ResampleStore(path, "effect", key, load=True).results == {}
    assert ResampleStore(path, "structure", key, load=False).results == {}
