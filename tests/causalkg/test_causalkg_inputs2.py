"""Bad input to build-causal-kg, recommend-path and download-frcsub, second round.

Every rejected input must exit 2 with a message that names the value and
write no run folder. The inputs are generated here: small simulated cohorts
and a network fitted on simulated skill profiles.
"""

from __future__ import annotations

import json
import logging

import h5py
import numpy as np
import pytest

from mmtk.causalkg.build import with_rate_order
from mmtk.causalkg.effects import cpd_tables, fit_network, quiet_pgmpy
from mmtk.causalkg.mastery import DINA
from mmtk.causalkg.network import CausalKnowledgeNetwork
from mmtk.causalkg.recommend import explain_path, recommend_path, skills_to_learn
from mmtk.causalkg.simulate import ARITHMETIC_EDGES, ARITHMETIC_SKILLS, sample_profiles, simulate_cohort
from mmtk.causalkg.structure import StructureSettings, as_categorical
from mmtk.core.errors import DataError


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def write_matrix(path, matrix):
    lines = [" ".join("NA" if np.isnan(v) else f"{v:g}" for v in row) for row in matrix]
    return write(path, "\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def cohort():
    """60 students simulated on the arithmetic network (24 items, 6 skills)."""
    return simulate_cohort(60, seed=3)


@pytest.fixture()
def cohort_files(cohort, tmp_path):
    """(responses path, Q-matrix path) of the cohort as whitespace-separated text."""
    return write_matrix(tmp_path / "r.txt", cohort.responses), write_matrix(tmp_path / "q.txt", cohort.q_matrix)


@pytest.fixture(scope="module")
def network_data(cohort):
    """network.json content of a network fitted on simulated arithmetic profiles, with a fitted DINA model."""
    quiet_pgmpy()
    profiles = sample_profiles(ARITHMETIC_SKILLS, ARITHMETIC_EDGES, 1500, np.random.default_rng(0))
    model = fit_network(as_categorical(profiles, ARITHMETIC_SKILLS), ARITHMETIC_EDGES)
    dina = DINA(max_iter=50).fit(cohort.responses, cohort.q_matrix)
    network = CausalKnowledgeNetwork(
        skills=[{"name": s, "description": f"skill {s}", "mastery_rate": float(profiles[:, k].mean())} for k, s in enumerate(ARITHMETIC_SKILLS)],
        edges=[{"parent": u, "child": v, "effect": 0.3, "ci_low": 0.2, "ci_high": 0.4, "frequency": 0.9, "direction_frequency": 0.8} for u, v in ARITHMETIC_EDGES],
        dropped_edges=[],
        cpds=cpd_tables(model),
        mastery_model=dina.parameters(),
        mastery_threshold=0.8,
    )
    return network.to_dict()


def save_network(folder, data):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "network.json").write_text(json.dumps(data), encoding="utf-8")
    return folder / "network.json"


@pytest.fixture()
def network_file(network_data, tmp_path):
    return save_network(tmp_path / "kg", network_data)


def recommend(cli, network, out, *overrides):
    """Run recommend-path on the simulated recipe without evaluation."""
    return cli("recommend-path", "simulated", f"network={network}", "evaluate.enabled=false", *overrides, "--out", out)


# ------------------------------------------------------- mastered target


def test_mastered_target_with_unmastered_ancestors(network_data):
    graph_network = CausalKnowledgeNetwork(**{k: v for k, v in network_data.items() if k != "schema"})
    mastery = {s: 0.0 for s in ARITHMETIC_SKILLS} | {"fractions": 1.0}
    assert skills_to_learn(graph_network.graph(), {"fractions"}, "fractions") == []
    steps = recommend_path(graph_network, mastery, "fractions")
    assert steps == []
    assert "already mastered" in explain_path(steps, "fractions")


def test_recommend_cli_mastered_target_gives_empty_path(cli, network_file, tmp_path):
    out = tmp_path / "path"
    result = recommend(cli, network_file, out, "student.mastery={fractions: 1.0}", "-q")
    assert result.exit_code == 0, result.output
    paths = json.loads((out / "paths.json").read_text())
    assert paths["students"][0]["steps"] == []
    assert "already mastered" in (out / "paths.txt").read_text()


# ---------------------------------------------------- build: response data


def test_build_rejects_inf_response_in_text(cli, cohort, cohort_files, tmp_path):
    responses, q_matrix = cohort_files
    matrix = cohort.responses.copy()
    matrix[4, 6] = np.inf
    write_matrix(responses, matrix)
    out = tmp_path / "run"
    result = cli("build-causal-kg", "frcsub", f"data.responses={responses}", f"data.q_matrix={q_matrix}", "--out", out)
    assert result.exit_code == 2
    assert "contains inf in row 5, column 7" in result.output
    assert not out.exists()


def test_build_rejects_minus_inf_response_in_hdf5(cli, cohort, tmp_path):
    matrix = cohort.responses.copy()
    matrix[2, 0] = -np.inf
    path = tmp_path / "r.h5"
    with h5py.File(path, "w") as handle:
        handle["responses"] = matrix
        handle["q_matrix"] = cohort.q_matrix
    out = tmp_path / "run"
    result = cli("build-causal-kg", "frcsub", f"data.responses={path}", "--out", out)
    assert result.exit_code == 2
    assert "contains -inf in row 3, column 1" in result.output
    assert not out.exists()


def test_build_rejects_too_few_students(cli, cohort, cohort_files, tmp_path):
    responses, q_matrix = cohort_files
    write_matrix(responses, cohort.responses[:1])
    out = tmp_path / "run"
    result = cli("build-causal-kg", "frcsub", f"data.responses={responses}", f"data.q_matrix={q_matrix}", "--out", out)
    assert result.exit_code == 2
    assert "has 1 student row(s)" in result.output
    assert "at least 10" in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    "content,message",
    [
        (b"\xff\xfe\x00\x01name\n", "as UTF-8 CSV"),
        (b"foo,bar\n1,2\n", "none of the accepted columns name, skill, description"),
    ],
)
def test_build_rejects_bad_skills_file(cli, cohort_files, tmp_path, content, message):
    responses, q_matrix = cohort_files
    skills = tmp_path / "skills.csv"
    skills.write_bytes(content)
    out = tmp_path / "run"
    result = cli("build-causal-kg", "frcsub", f"data.responses={responses}", f"data.q_matrix={q_matrix}", f"data.skills={skills}", "--out", out)
    assert result.exit_code == 2
    assert message in result.output
    assert str(skills) in result.output
    assert not out.exists()


def test_skills_file_with_bom_and_extra_column(cli, cohort_files, tmp_path):
    responses, q_matrix = cohort_files
    rows = "".join(f"{name},{k + 1},skill {k + 1}\n" for k, name in enumerate(ARITHMETIC_SKILLS))
    skills = tmp_path / "skills.csv"
    skills.write_bytes(("\ufeffname,column_in_q,description\n" + rows).encode("utf-8"))
    from mmtk.causalkg.data import load_response_data

    data = load_response_data(responses, q_matrix, skills)
    assert data.skill_names == ARITHMETIC_SKILLS
    assert data.skill_descriptions[2] == "skill 3"


def test_build_rejects_simulated_source_with_responses(cli, cohort_files, tmp_path):
    responses, _ = cohort_files
    out = tmp_path / "run"
    result = cli("build-causal-kg", "simulated", f"data.responses={responses}", "--out", out)
    assert result.exit_code == 2
    assert "data.source=simulated" in result.output
    assert "data.responses=null" in result.output
    assert not out.exists()


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_build_rejects_min_effect_out_of_range(cli, tmp_path, value):
    out = tmp_path / "run"
    result = cli("build-causal-kg", "simulated", f"effects.min_effect={value}", "--out", out)
    assert result.exit_code == 2
    assert "effects.min_effect" in result.output
    assert not out.exists()


# ------------------------------------------------------------ DINA fitting


def test_unsmoothed_dina_fits_at_least_as_well(cohort):
    smoothed = DINA(prior_smoothing=0.01).fit(cohort.responses, cohort.q_matrix)
    maximum_likelihood = DINA(prior_smoothing=0.0).fit(cohort.responses, cohort.q_matrix)
    assert np.isfinite(maximum_likelihood.log_likelihood)
    assert maximum_likelihood.log_likelihood >= smoothed.log_likelihood - 1e-6
    assert maximum_likelihood.profile_prior.sum() == pytest.approx(1.0)


def test_prior_smoothing_recipe_key_reaches_dina(cli, tmp_path):
    out = tmp_path / "run"
    args = ["data.simulated_students=200", "bootstrap.resamples=2", "bootstrap.workers=1", "--out"]
    assert cli("build-causal-kg", "simulated", "mastery.prior_smoothing=0", *args, out / "mle", "-q").exit_code == 0
    assert cli("build-causal-kg", "simulated", *args, out / "smoothed", "-q").exit_code == 0
    mle = json.loads((out / "mle" / "summary.json").read_text())["mastery_log_likelihood"]
    smoothed = json.loads((out / "smoothed" / "summary.json").read_text())["mastery_log_likelihood"]
    assert mle >= smoothed - 1e-6
    assert mle != smoothed


@pytest.fixture()
def mmtk_log(caplog, monkeypatch):
    """caplog that also sees mmtk's records after a CLI call has set propagate=False on the mmtk logger."""
    monkeypatch.setattr(logging.getLogger("mmtk"), "propagate", True)
    return caplog


def test_max_iter_warning_gives_last_gain(cohort, mmtk_log):
    start = DINA(max_iter=1)
    start.q_matrix = np.asarray(cohort.q_matrix)
    start.slip = np.full(cohort.q_matrix.shape[0], start.init_slip)
    start.guess = np.full(cohort.q_matrix.shape[0], start.init_guess)
    start.profile_prior = np.full(2 ** cohort.q_matrix.shape[1], 2.0 ** -cohort.q_matrix.shape[1])
    _, initial = start._posterior(cohort.responses, start._eta())

    with mmtk_log.at_level(logging.WARNING):
        model = DINA(max_iter=1).fit(cohort.responses, cohort.q_matrix)
    gain = model.log_likelihood - initial
    assert gain > 1.0
    assert f"raised the log-likelihood by {gain:.3g} nats" in mmtk_log.text


def test_required_edge_against_mastery_rate_is_logged(mmtk_log):
    settings = StructureSettings(required=[("b", "a")])
    with mmtk_log.at_level(logging.INFO):
        oriented = with_rate_order(settings, ["a", "b"], np.array([0.8, 0.3]))
    assert ("b", "a") not in oriented.forbidden
    assert "required edge b -> a kept although orient_by_mastery_rate would forbid it" in mmtk_log.text


# ---------------------------------------------------- recommend: students


def set_cell(row, column, value):
    def edit(matrix):
        matrix[row, column] = value

    return edit


def clear_row(row):
    def edit(matrix):
        matrix[row] = np.nan

    return edit


@pytest.mark.parametrize(
    "edit,message",
    [
        (set_cell(1, 4, np.inf), "contains inf in row 2, column 5"),
        (set_cell(0, 3, 2), "row 1, column 4 holds 2"),
        (clear_row(2), "student row(s) 3 answered no item"),
    ],
)
def test_recommend_rejects_bad_students_file(cli, cohort, network_file, tmp_path, edit, message):
    matrix = cohort.responses[:3].copy()
    edit(matrix)
    students = write_matrix(tmp_path / "s.txt", matrix)
    out = tmp_path / "path"
    result = recommend(cli, network_file, out, "student.mastery=null", f"student.file={students}")
    assert result.exit_code == 2
    assert message in result.output
    assert str(students) in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    "content,message",
    [
        (b"addition,subtraction\n0.9,abc\n", "line 2, skill subtraction contains 'abc', which is not a number"),
        (b"addition,subtraction\n0.9,0.5,0.3\n", "line 2 has 3 cells but the header has 2"),
        (b"addition,subtraction\n0.9,0.5\n0.2,1.7\n", "line 3, skill subtraction contains 1.7"),
        (b"addition,subtraction\n0.9,nan\n", "line 2, skill subtraction contains nan"),
        (b"\xefaddition\n0.9\n", "as UTF-8 CSV"),
        (b"\x89HDF\r\n\x1a\n\x00\x00", "as UTF-8 CSV"),
        (b"student\nbob\n", "has no skill column"),
        (b"addition,foo\n0.9,0.5\n", "unknown skill(s) 'foo'"),
        (b"addition,addition\n0.9,0.5\n", "names the column(s) 'addition' more than once"),
    ],
)
def test_recommend_rejects_bad_mastery_file(cli, network_file, tmp_path, content, message):
    students = tmp_path / "m.csv"
    students.write_bytes(content)
    out = tmp_path / "path"
    result = recommend(cli, network_file, out, "student.mastery=null", f"student.file={students}", "student.file_kind=mastery")
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_mastery_file_with_bom(cli, network_file, tmp_path):
    students = tmp_path / "m.csv"
    students.write_bytes("\ufeffstudent,addition,number_sense\nann,0.9,0.95\n".encode("utf-8"))
    out = tmp_path / "path"
    result = recommend(cli, network_file, out, "student.mastery=null", f"student.file={students}", "student.file_kind=mastery", "-q")
    assert result.exit_code == 0, result.output
    entry = json.loads((out / "paths.json").read_text())["students"][0]
    assert entry["student"] == "ann"
    assert entry["mastery"]["addition"] == 0.9
    assert entry["mastery"]["number_sense"] == 0.95


# -------------------------------------------------- recommend: network file


def edit_skill_string(data):
    data["skills"][0] = "number_sense"


def edit_drop_slip(data):
    del data["mastery_model"]["slip"]


def edit_threshold(value):
    def edit(data):
        data["mastery_threshold"] = value

    return edit


def edit_add_cycle(data):
    # fractions -> number_sense closes number_sense -> addition -> subtraction -> fractions.
    data["edges"].append({"parent": "fractions", "child": "number_sense", "effect": 0.3, "ci_low": 0.2, "ci_high": 0.4, "frequency": 0.9, "direction_frequency": 0.8})


def edit_unnormalised_cpd(data):
    values = data["cpds"]["addition"]["values"]
    values[0][0], values[1][0] = 0.5, 0.3


def edit_drop_cpd(data):
    del data["cpds"]["division"]


def edit_unknown_edge_skill(data):
    data["edges"][0]["child"] = "K99"


def edit_drop_edge(data):
    data["edges"] = [e for e in data["edges"] if (e["parent"], e["child"]) != ("addition", "subtraction")]


@pytest.mark.parametrize(
    "edit,message",
    [
        (edit_skill_string, "skills entry 1 ('number_sense') is not a record"),
        (edit_drop_slip, "mastery_model is incomplete or malformed (KeyError: 'slip')"),
        (edit_threshold("abc"), "mastery_threshold 'abc' must be a number in (0, 1]"),
        (edit_threshold(1.5), "mastery_threshold 1.5 must be a number in (0, 1]"),
        (edit_threshold(0), "mastery_threshold 0 must be a number in (0, 1]"),
        (edit_add_cycle, "the edges form the cycle"),
        (edit_unnormalised_cpd, "column 1 of the table of addition sums to 0.8"),
        (edit_drop_cpd, "no conditional probability table for division"),
        (edit_unknown_edge_skill, "names the unknown skill 'K99'"),
        (edit_drop_edge, "edge addition -> subtraction is in the table parents of subtraction but not in the edges list"),
    ],
)
def test_recommend_rejects_edited_network(cli, network_data, tmp_path, edit, message):
    data = json.loads(json.dumps(network_data))
    edit(data)
    path = save_network(tmp_path / "kg", data)
    out = tmp_path / "path"
    result = recommend(cli, path, out)
    assert result.exit_code == 2
    assert message in result.output
    assert str(path) in result.output
    assert not out.exists()


def test_cycle_message_names_the_cycle(network_data, tmp_path):
    data = json.loads(json.dumps(network_data))
    edit_add_cycle(data)
    path = save_network(tmp_path / "kg", data)
    with pytest.raises(DataError, match="fractions -> number_sense"):
        CausalKnowledgeNetwork.read(path)


def test_recommend_rejects_graphml_network(cli, network_file, tmp_path):
    graphml = network_file.parent / "network.graphml"
    CausalKnowledgeNetwork.read(network_file).write_graphml(graphml)
    out = tmp_path / "path"
    result = recommend(cli, graphml, out)
    assert result.exit_code == 2
    assert "Pass the network.json written by 'mmtk build-causal-kg' or its run folder" in result.output
    assert "network.graphml and other exports cannot be read back" in result.output
    assert not out.exists()


def test_written_network_passes_the_checks(network_file):
    network = CausalKnowledgeNetwork.read(network_file)
    assert network.skill_names == ARITHMETIC_SKILLS
    assert len(network.edges) == len(ARITHMETIC_EDGES)


# --------------------------------------------------------------- download


@pytest.mark.parametrize(
    "url,message",
    [
        ("", "--url is empty"),
        ("notaurl/", "is not a URL (no scheme)"),
    ],
)
def test_download_rejects_bad_url(cli, tmp_path, url, message):
    destination = tmp_path / "data"
    result = cli("download-frcsub", destination, "--url", url)
    assert result.exit_code == 2
    assert message in result.output
    assert not destination.exists()


def test_download_rejects_unsupported_url_scheme(tmp_path):
    from mmtk.causalkg.data import download_frcsub
    from mmtk.core.errors import InputError

    with pytest.raises(InputError, match="unsupported scheme 'nosuch'"):
        download_frcsub(tmp_path / "data", "nosuch://host/")
    assert not (tmp_path / "data").exists()


def test_download_missing_local_file(cli, tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    destination = tmp_path / "data"
    result = cli("download-frcsub", destination, "--url", mirror.as_uri())
    assert result.exit_code == 2
    assert f"cannot read {mirror / 'data.txt'}" in result.output
    assert "local folder that contains data.txt and q.txt" in result.output
    assert "network connection" not in result.output
    assert not destination.exists()


def test_download_below_a_file(cli, tmp_path):
    blocking = tmp_path / "file"
    blocking.write_text("x")
    destination = blocking / "sub"
    result = cli("download-frcsub", destination, "--url", tmp_path.as_uri())
    assert result.exit_code == 2
    assert f"because {blocking} is a file" in result.output
    assert blocking.read_text() == "x"
