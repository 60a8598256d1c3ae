"""Validation of a coco-mini style ``captions.jsonl`` (read_coco_mini)."""

from __future__ import annotations

import json

import pytest

from mmtk.core.errors import DataError
from mmtk.mmar.data import read_coco_mini


def write_folder(folder, index: bytes) -> None:
    """Write ``images/1.jpg`` (any bytes) and the caption index ``index`` into ``folder``."""
    (folder / "images").mkdir()
    (folder / "images" / "1.jpg").write_bytes(b"placeholder")
    (folder / "captions.jsonl").write_bytes(index)


def test_valid_record_reads_captions(tmp_path):
    write_folder(tmp_path, json.dumps({"image_id": 1, "file": "images/1.jpg", "captions": [" A cat. ", "A dog."]}).encode() + b"\n")
    records = read_coco_mini(tmp_path)
    assert len(records) == 1
    assert records[0].image_id == 1
    assert records[0].captions == ["A cat.", "A dog."]


@pytest.mark.parametrize("record", [{"image_id": 1, "file": "images/1.jpg", "captions": "A cat on a mat."}, [1, 2], None, {"file": 1, "captions": ["A cat."]}])
def test_malformed_record_rejected(tmp_path, record):
    write_folder(tmp_path, json.dumps(record).encode() + b"\n")
    with pytest.raises(DataError, match="line 1 is not a valid caption record"):
        read_coco_mini(tmp_path)


def test_non_utf8_index_rejected(tmp_path):
    write_folder(tmp_path, json.dumps({"file": "images/1.jpg", "captions": ["A cat."]}).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match="write it as UTF-8"):
        read_coco_mini(tmp_path)
