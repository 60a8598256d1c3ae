"""The build-causal-kg, recommend-path and download-frcsub commands end to end."""

from __future__ import annotations

import json

import networkx as nx
import pytest

SMALL_BUILD = ["bootstrap.resamples=6", "bootstrap.workers=2"]
SMALL_EVALUATION = ["evaluate.students=40", "evaluate.steps=3"]


@pytest.fixture(scope="module")
def frcsub_network(shared_data, tmp_path_factory):
    from typer.testing import CliRunner

    from mmtk_commands.main import app

    out = tmp_path_factory.mktemp("kg") / "run"
    result = CliRunner().invoke(app, ["build-causal-kg", "frcsub", f"data.responses={shared_data / 'frcsub'}", *SMALL_BUILD, "--out", str(out), "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def test_build_on_frcsub_writes_network(frcsub_network):
    summary = json.loads((frcsub_network / "summary.json").read_text())
    network = json.loads((frcsub_network / "network.json").read_text())
    assert summary["n_students"] == 536
    assert summary["n_skills"] == 8
    assert summary["n_edges"] == len(network["edges"]) > 0
    assert len(network["mastery_model"]["slip"]) == 20
    assert all(edge["effect"] >= 0.05 for edge in network["edges"])
    assert all(edge["ci_low"] <= edge["ci_high"] for edge in network["edges"])
    graph = nx.read_graphml(frcsub_network / "network.graphml")
    assert nx.is_directed_acyclic_graph(graph)
    assert graph.number_of_edges() == summary["n_edges"]
    assert (frcsub_network / "network.png").stat().st_size > 10_000
    assert "P(K1" in (frcsub_network / "cpts.txt").read_text() or "K1" in (frcsub_network / "cpts.txt").read_text()
    for table in network["cpds"].values():
        columns = zip(*table["values"])
        assert all(sum(column) == pytest.approx(1.0) for column in columns)


def test_recommend_on_frcsub_network(cli, frcsub_network, tmp_path):
    out = tmp_path / "path"
    result = cli("recommend-path", "frcsub", f"network={frcsub_network}", *SMALL_EVALUATION, "--out", out, "-q")
    assert result.exit_code == 0, result.output
    paths = json.loads((out / "paths.json").read_text())
    graph = nx.read_graphml(frcsub_network / "network.graphml")
    steps = [step["skill"] for step in paths["students"][0]["steps"]]
    assert steps and steps[-1] == "K5"
    assert set(steps) <= nx.ancestors(graph, "K5") | {"K5"}
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert set(evaluation["strategies"]) == {"recommended", "topological", "random"}
    assert "learning path to K5" in (out / "paths.txt").read_text()


def test_recommend_file_of_students(cli, frcsub_network, shared_data, tmp_path):
    out = tmp_path / "many"
    result = cli("recommend-path", "frcsub", f"network={frcsub_network}", "student.responses=[]", f"student.file={shared_data / 'frcsub' / 'data.txt'}", "evaluate.enabled=false", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    paths = json.loads((out / "paths.json").read_text())
    assert len(paths["students"]) == 536
    assert not (out / "evaluation.json").exists()


def test_recommend_mastery_file(cli, frcsub_network, tmp_path):
    students = write(tmp_path / "m.csv", "student,K7,K2\nann,0.9,0.95\nbob,0.1,0.0\n")
    out = tmp_path / "mastery"
    result = cli("recommend-path", "frcsub", f"network={frcsub_network}", "student.responses=[]", f"student.file={students}", "student.file_kind=mastery", "evaluate.enabled=false", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    paths = json.loads((out / "paths.json").read_text())
    assert [s["student"] for s in paths["students"]] == ["ann", "bob"]
    ann_steps = [step["skill"] for step in paths["students"][0]["steps"]]
    bob_steps = [step["skill"] for step in paths["students"][1]["steps"]]
    assert "K7" not in ann_steps
    assert len(bob_steps) >= len(ann_steps)


def test_simulated_recipes_end_to_end(cli, tmp_path):
    build = tmp_path / "kg"
    constraints = ["structure.required_edges=[[number_sense, division]]", "structure.forbidden_edges=[[multiplication, division], [division, multiplication]]"]
    result = cli("build-causal-kg", "simulated", "data.simulated_students=600", *SMALL_BUILD, *constraints, "--out", build, "-q")
    assert result.exit_code == 0, result.output
    network = json.loads((build / "network.json").read_text())
    learned = {frozenset((e["parent"], e["child"])) for e in network["edges"]}
    assert frozenset(("addition", "subtraction")) in learned
    assert frozenset(("multiplication", "division")) not in learned
    assert ("number_sense", "division") in {(e["parent"], e["child"]) for e in network["edges"]}
    path = tmp_path / "path"
    result = cli("recommend-path", "simulated", f"network={build / 'network.json'}", *SMALL_EVALUATION, "--out", path, "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((path / "summary.json").read_text())["path"][-1] == "fractions"


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "responses,q_matrix,message",
    [
        ("1 0 2\n0 1 1\n", "1 0\n0 1\n1 1\n", "must be binary"),
        ("1 0 1\n0 1 1\n", "1 0\n0 1\n", "has 2 items"),
        ("1 0 1\n0 1 1\n", "1 0 0\n0 1 0\n1 1 0\n", "measured by no item"),
    ],
)
def test_build_rejects_bad_data(cli, tmp_path, caplog, responses, q_matrix, message):
    out = tmp_path / "run"
    r, q = write(tmp_path / "r.txt", responses), write(tmp_path / "q.txt", q_matrix)
    result = cli("build-causal-kg", "frcsub", f"data.responses={r}", f"data.q_matrix={q}", "--out", out)
    assert result.exit_code == 2
    assert message in caplog.text
    assert not out.exists()


def test_build_without_data_path_exits_2(cli, tmp_path, caplog):
    out = tmp_path / "run"
    assert cli("build-causal-kg", "frcsub", "--out", out).exit_code == 2
    assert "data.responses is not set" in caplog.text
    assert not out.exists()


def test_recommend_rejects_unknown_target(cli, frcsub_network, tmp_path, caplog):
    out = tmp_path / "path"
    result = cli("recommend-path", "frcsub", f"network={frcsub_network}", "target=K99", "--out", out)
    assert result.exit_code == 2
    assert "unknown target skill 'K99'" in caplog.text
    assert not out.exists()


def test_recommend_rejects_wrong_response_count(cli, frcsub_network, tmp_path, caplog):
    out = tmp_path / "path"
    result = cli("recommend-path", "frcsub", f"network={frcsub_network}", "student.responses=[1, 0]", "--out", out)
    assert result.exit_code == 2
    assert "has 2 responses per student" in caplog.text
    assert not out.exists()


def test_download_command_with_file_url(cli, shared_data, tmp_path):
    destination = tmp_path / "data"
    result = cli("download-frcsub", destination, "--url", (shared_data / "frcsub").as_uri() + "/", "-q")
    assert result.exit_code == 0, result.output
    assert (destination / "q.txt").read_bytes() == (shared_data / "frcsub" / "q.txt").read_bytes()


def test_recommend_switches_student_source_with_null(cli, frcsub_network, tmp_path):
    out = tmp_path / "path"
    result = cli("recommend-path", "frcsub", f"network={frcsub_network}", "student.responses=null", "student.mastery={K1: 1.0}", "evaluate.enabled=false", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    paths = json.loads((out / "paths.json").read_text())
    assert paths["students"][0]["mastery"]["K1"] == 1.0
    assert paths["students"][0]["mastery"]["K2"] == 0.0


def test_recommend_names_out_of_range_mastery(cli, frcsub_network, tmp_path):
    out = tmp_path / "path"
    result = cli("recommend-path", "frcsub", f"network={frcsub_network}", "student.responses=null", "student.mastery={K1: 1.5}", "--out", out)
    assert result.exit_code == 2
    assert "K1=1.5" in result.output
    assert not out.exists()
