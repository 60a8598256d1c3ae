"""Reading and validating responses and Q-matrices, and the checksum-checked FrcSub download."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from mmtk.causalkg import data as data_module
from mmtk.causalkg.data import FRCSUB_SHA256, download_frcsub, load_response_data, read_matrix
from mmtk.core.errors import DataError, InputError
from mmtk.core.hdf5 import write_datasets


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_frcsub_folder_layout(shared_data):
    loaded = load_response_data(shared_data / "frcsub")
    assert loaded.responses.shape == (536, 20)
    assert loaded.q_matrix.shape == (20, 8)
    assert loaded.skill_names == [f"K{k}" for k in range(1, 9)]
    assert loaded.q_matrix.sum(axis=0).tolist() == [3, 13, 3, 5, 8, 2, 19, 3]
    assert loaded.responses.mean() == pytest.approx(0.534, abs=0.001)
    assert loaded.skill_descriptions[6].startswith("Subtract the numerators")


def test_csv_with_header_and_missing(tmp_path):
    responses = write(tmp_path / "r.csv", "i1,i2,i3\n1,0,NA\n0,,1\n")
    q_matrix = write(tmp_path / "q.csv", "add,sub\n1,0\n0,1\n1,1\n")
    loaded = load_response_data(responses, q_matrix)
    assert loaded.skill_names == ["add", "sub"]
    assert np.isnan(loaded.responses[0, 2])
    assert np.isnan(loaded.responses[1, 1])
    assert loaded.responses[1, 2] == 1.0


def test_hdf5_responses_with_nan(tmp_path):
    path = tmp_path / "cohort.h5"
    responses = np.array([[1.0, np.nan], [0.0, 1.0]])
    write_datasets(path, {"responses": responses, "q_matrix": np.array([[1.0], [1.0]]), "skill_names": ["s"]}, schema="test/1")
    loaded = load_response_data(path)
    assert loaded.skill_names == ["s"]
    np.testing.assert_array_equal(np.isnan(loaded.responses), np.isnan(responses))


def test_text_matrix_reader(tmp_path):
    matrix, names = read_matrix(write(tmp_path / "m.txt", "1\t0\r\n0\t1\r\n"), "responses")
    assert names is None
    assert matrix.tolist() == [[1.0, 0.0], [0.0, 1.0]]


@pytest.mark.parametrize(
    "responses,q_matrix,message",
    [
        ("1 2\n0 1\n", "1\n1\n", "must be binary"),
        ("1 0\n0 1\n", "1\n1\n1\n", "has 3 items .rows. but the response matrix"),
        ("1 0\n0 1\n", "1 0\n1 0\n", "skill column.s. 2 are measured by no item"),
        ("1 0 1\n0 1 1\n", "1 0\n0 0\n0 1\n", "item row.s. 2 need no skill"),
        ("1 0\nNA NA\n", "1\n1\n", "answered no item"),
        ("1 0\n0 x\n", "1\n1\n", "is not a number"),
        ("1 0\n0\n", "1\n1\n", "Every row must have the same number"),
    ],
)
def test_invalid_input_is_rejected(tmp_path, responses, q_matrix, message):
    with pytest.raises(DataError, match=message):
        load_response_data(write(tmp_path / "r.txt", responses), write(tmp_path / "q.txt", q_matrix))


def test_missing_q_matrix_is_input_error(tmp_path):
    with pytest.raises(InputError, match="no Q-matrix"):
        load_response_data(write(tmp_path / "r.txt", "1 0\n"))


def test_skill_name_count_must_match(tmp_path):
    with pytest.raises(DataError, match="2 skill names given"):
        load_response_data(write(tmp_path / "r.txt", "1 0\n"), write(tmp_path / "q.txt", "1\n1\n"), skill_names=["a", "b"])


def test_download_from_file_url(shared_data, tmp_path):
    destination = tmp_path / "frcsub"
    written = download_frcsub(destination, base_url=(shared_data / "frcsub").as_uri() + "/")
    assert sorted(p.name for p in written) == ["data.txt", "q.txt", "skills.csv"]
    for name, digest in FRCSUB_SHA256.items():
        assert hashlib.sha256((destination / name).read_bytes()).hexdigest() == digest
    assert (destination / "data.txt").read_bytes() == (shared_data / "frcsub" / "data.txt").read_bytes()
    loaded = load_response_data(destination)
    assert loaded.skill_names == [f"K{k}" for k in range(1, 9)]


def test_download_checksum_mismatch_leaves_nothing(tmp_path):
    destination = tmp_path / "frcsub"

    def tampered(url):
        return b"1\t0\r\n"

    with pytest.raises(DataError, match="checksum mismatch"):
        download_frcsub(destination, fetch=tampered)
    assert not destination.exists()


def test_download_network_error_names_url(tmp_path, monkeypatch):
    def offline(url, timeout_s=60.0):
        raise OSError("network is unreachable")

    monkeypatch.setattr(data_module, "_fetch_bytes", offline)
    with pytest.raises(Exception, match="download of .*data.txt failed"):
        download_frcsub(tmp_path / "x", fetch=data_module._fetch_bytes)
    assert not (tmp_path / "x").exists()
