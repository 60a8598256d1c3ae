"""Bad input to the causal knowledge network tools: each must exit 2 with a message that names the problem."""

from __future__ import annotations

import pytest

from mmtk.causalkg.data import download_frcsub
from mmtk.causalkg.structure import StructureSettings, check_constraints
from mmtk.core.errors import InputError


def test_missing_responses_folder_is_reported_as_not_found(cli, tmp_path):
    out = tmp_path / "run"
    result = cli("build-causal-kg", "frcsub", f"data.responses={tmp_path / 'nonexistent' / 'folder'}", "--out", out)
    assert result.exit_code == 2
    assert "not found" in result.output
    assert "nonexistent" in result.output
    assert "no Q-matrix" not in result.output
    assert not out.exists()


def test_required_cycle_message_closes_the_cycle():
    settings = StructureSettings(required=[["K1", "K2"], ["K2", "K1"]])
    with pytest.raises(InputError, match="K1 -> K2 -> K1"):
        check_constraints(settings, ["K1", "K2"])


def test_build_rejects_cuda_device(cli, tmp_path):
    out = tmp_path / "run"
    result = cli("build-causal-kg", "simulated", "--device", "cuda", "--out", out)
    assert result.exit_code == 2
    assert not out.exists()


@pytest.fixture()
def frcsub_copy(shared_data, tmp_path):
    """A file:// base URL (without trailing slash) of a copy of the FrcSub files."""
    source = tmp_path / "mirror"
    source.mkdir()
    for name in ("data.txt", "q.txt"):
        (source / name).write_bytes((shared_data / "frcsub" / name).read_bytes())
    return source.as_uri()


def test_download_url_without_trailing_slash(cli, frcsub_copy, tmp_path):
    destination = tmp_path / "data"
    result = cli("download-frcsub", destination, "--url", frcsub_copy, "-q")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in destination.iterdir()) == ["data.txt", "q.txt", "skills.csv"]


def test_download_keeps_edited_skills_file_unless_forced(cli, frcsub_copy, tmp_path):
    destination = tmp_path / "data"
    download_frcsub(destination, frcsub_copy)
    edited = "name,skill,description\nA,1,mine\n"
    (destination / "skills.csv").write_text(edited)

    result = cli("download-frcsub", destination, "--url", frcsub_copy)
    assert result.exit_code == 2
    assert "skills.csv" in result.output
    assert "--force" in result.output
    assert (destination / "skills.csv").read_text() == edited

    result = cli("download-frcsub", destination, "--url", frcsub_copy, "--force", "-q")
    assert result.exit_code == 0, result.output
    assert (destination / "skills.csv").read_text() != edited


def test_download_again_with_same_content_succeeds(frcsub_copy, tmp_path):
    destination = tmp_path / "data"
    first = download_frcsub(destination, frcsub_copy)
    assert download_frcsub(destination, frcsub_copy) == first


def test_download_to_existing_file_exits_2(cli, frcsub_copy, tmp_path):
    target = tmp_path / "taken"
    target.write_text("x")
    result = cli("download-frcsub", target, "--url", frcsub_copy)
    assert result.exit_code == 2
    assert "is a file" in result.output
    assert target.read_text() == "x"
