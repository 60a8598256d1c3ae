"""Atomic writes and schema-checked HDF5 reads."""

from __future__ import annotations

import numpy as np
import pytest

from mmtk.core import io
from mmtk.core.errors import DataError
from mmtk.core.hdf5 import DatasetSpec, read_datasets, write_datasets


def test_atomic_write_keeps_old_content_on_error(tmp_path):
    target = tmp_path / "result.txt"
    io.write_text(target, "old")
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.txt"]


SPECS = {"c": DatasetSpec(("n", "species")), "t": DatasetSpec(("n",)), "names": DatasetSpec(("species",), kind="S")}


def test_roundtrip_with_strings_and_attrs(tmp_path):
    path = tmp_path / "d.h5"
    c = np.arange(6.0).reshape(3, 2)
    write_datasets(path, {"c": c, "t": np.arange(3.0), "names": ["A", "B"]}, schema="mmtk.test/1", attrs={"seed": 3})
    arrays, attrs = read_datasets(path, SPECS, schema="mmtk.test/1")
    np.testing.assert_array_equal(arrays["c"], c)
    assert arrays["names"] == ["A", "B"]
    assert attrs["seed"] == 3
    assert attrs["mmtk_schema"] == "mmtk.test/1"


def test_shape_mismatch_between_named_axes(tmp_path):
    path = tmp_path / "d.h5"
    write_datasets(path, {"c": np.zeros((3, 2)), "t": np.zeros(4), "names": ["A", "B"]}, schema="mmtk.test/1")
    with pytest.raises(DataError, match="'t' .* has 4 entries on axis 0 but 'c' has 3"):
        read_datasets(path, SPECS)


def test_nan_missing_dataset_and_wrong_schema(tmp_path):
    path = tmp_path / "d.h5"
    write_datasets(path, {"c": np.array([[np.nan, 1.0]]), "t": np.zeros(1), "names": ["A", "B"]}, schema="mmtk.other/1")
    with pytest.raises(DataError, match="has schema 'mmtk.other/1'"):
        read_datasets(path, SPECS, schema="mmtk.test/1")
    with pytest.raises(DataError, match="1 NaN or infinite values"):
        read_datasets(path, SPECS)
    with pytest.raises(DataError, match="has no dataset 'x'"):
        read_datasets(path, {"x": DatasetSpec((None,))})


def test_truncated_and_missing_file(tmp_path):
    path = tmp_path / "d.h5"
    write_datasets(path, {"c": np.zeros((100, 2))}, schema="mmtk.test/1")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match="truncated or not an HDF5 file"):
        read_datasets(path, {"c": DatasetSpec((None, None))})
    with pytest.raises(DataError, match="data file not found"):
        read_datasets(tmp_path / "absent.h5", {})
