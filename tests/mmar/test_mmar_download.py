"""``mmtk download-coco-mini`` against small COCO-like archives served from file:// URLs (no network)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest

from mmtk.mmar import coco

# 139: RGB, 431848: greyscale (mode L), 802: NoDerivs licence; plus one id the manifest does not list.
IMAGE_IDS = (139, 431848, 802)
EXTRA_ID = 11813


def shared_rows(shared_data: Path) -> tuple[dict[int, dict[str, str]], dict[int, list[str]]]:
    folder = shared_data / "coco-mini"
    with open(folder / "images.csv", encoding="utf-8") as handle:
        rows = {int(r["image_id"]): r for r in csv.DictReader(handle)}
    captions = {}
    for line in (folder / "captions.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        captions[record["image_id"]] = record["captions"]
    return rows, captions


def enlarged_jpeg(path: Path) -> bytes:
    """Return the photo enlarged to twice its size, so the tool has to shrink it back to 256 px."""
    from PIL import Image

    with Image.open(path) as image:
        big = image.resize((image.width * 2, image.height * 2), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        big.save(out, "JPEG", quality=95)
    return out.getvalue()


def build_archives(shared_data: Path, source: Path) -> dict[str, coco.Archive]:
    """Write annotations_trainval2017.zip and val2017.zip below ``source`` in COCO's layout; return their Archive entries."""
    rows, captions = shared_rows(shared_data)
    ids = IMAGE_IDS + (EXTRA_ID,)
    licences = {int(rows[i]["license_id"]): {"id": int(rows[i]["license_id"]), "name": rows[i]["license_name"], "url": rows[i]["license_url"]} for i in ids}
    images = [
        {"id": i, "file_name": rows[i]["coco_file_name"], "width": int(rows[i]["orig_width"]), "height": int(rows[i]["orig_height"]), "license": int(rows[i]["license_id"]),
         "flickr_url": rows[i]["flickr_url"], "coco_url": rows[i]["coco_url"], "date_captured": rows[i]["date_captured"]}
        for i in ids
    ]
    # Annotation ids rise with each photo's caption order, but the list is stored in reverse, so the tool has to sort.
    annotations = [{"id": 1000 * k + j, "image_id": i, "caption": c} for k, i in enumerate(ids) for j, c in enumerate(captions[i])][::-1]
    content = {"info": {"description": "COCO 2017 Dataset"}, "licenses": list(licences.values()), "images": images, "annotations": annotations}

    (source / "annotations").mkdir(parents=True)
    (source / "zips").mkdir()
    annotations_zip = source / "annotations" / "annotations_trainval2017.zip"
    with zipfile.ZipFile(annotations_zip, "w") as archive:
        archive.writestr("annotations/captions_val2017.json", json.dumps(content))
        archive.writestr("annotations/instances_val2017.json", "{}")
    val_zip = source / "zips" / "val2017.zip"
    with zipfile.ZipFile(val_zip, "w") as archive:
        for i in ids:
            archive.writestr(f"val2017/{i:012d}.jpg", enlarged_jpeg(shared_data / "coco-mini" / "images" / f"{i}.jpg"))
    return {
        "annotations": coco.Archive("annotations/annotations_trainval2017.zip", hashlib.md5(annotations_zip.read_bytes()).hexdigest(), annotations_zip.stat().st_size),
        "val2017": coco.Archive("zips/val2017.zip", hashlib.md5(val_zip.read_bytes()).hexdigest(), val_zip.stat().st_size),
    }


@pytest.fixture()
def served(shared_data, tmp_path, monkeypatch):
    """COCO-like archives under tmp_path/source, with the tool's checksums and manifest pointed at them."""
    source = tmp_path / "source"
    archives = build_archives(shared_data, source)
    monkeypatch.setattr(coco, "COCO_ARCHIVES", archives)
    monkeypatch.setattr(coco, "VAL2017_IMAGE_IDS", IMAGE_IDS)
    return source, source.as_uri() + "/"


def test_download_writes_coco_mini_layout(served, shared_data, tmp_path, cli):
    from PIL import Image

    from mmtk.mmar.data import read_coco_mini

    _, base_url = served
    destination = tmp_path / "out" / "coco-mini"
    result = cli("download-coco-mini", destination, "--base-url", base_url, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["images"] == 3

    rows, captions = shared_rows(shared_data)
    assert sorted(p.name for p in (destination / "images").iterdir()) == sorted(f"{i}.jpg" for i in IMAGE_IDS)
    for image_id in IMAGE_IDS:
        with Image.open(destination / "images" / f"{image_id}.jpg") as image:
            assert max(image.size) == 256
            assert image.size == (int(rows[image_id]["width"]), int(rows[image_id]["height"]))
            assert image.mode == ("L" if image_id == 431848 else "RGB")

    records = [json.loads(line) for line in (destination / "captions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["image_id"] for r in records] == sorted(IMAGE_IDS)
    for record in records:
        assert record["captions"] == captions[record["image_id"]]
        assert record["file"] == f"images/{record['image_id']}.jpg"
        assert record["license_id"] == int(rows[record["image_id"]]["license_id"])

    with open(destination / "images.csv", encoding="utf-8") as handle:
        written = list(csv.DictReader(handle))
    assert tuple(written[0].keys()) == coco.CSV_COLUMNS
    for row in written:
        expected = rows[int(row["image_id"])]
        for column in ("coco_split", "coco_file_name", "width", "height", "orig_width", "orig_height", "license_id", "license_name", "license_url", "flickr_url", "coco_url", "date_captured"):
            assert row[column] == expected[column], column

    for line in (destination / "MD5SUMS.images").read_text().splitlines():
        digest, name = line.split("  ")
        assert hashlib.md5((destination / "images" / name).read_bytes()).hexdigest() == digest

    assert len(read_coco_mini(destination)) == 3
    assert sorted(p.name for p in destination.parent.iterdir()) == ["coco-mini"]


def test_corrupted_archive_exits_2(served, tmp_path, cli):
    source, base_url = served
    val_zip = source / "zips" / "val2017.zip"
    data = bytearray(val_zip.read_bytes())
    data[len(data) // 2] ^= 0xFF
    val_zip.write_bytes(bytes(data))

    destination = tmp_path / "out" / "coco-mini"
    result = cli("download-coco-mini", destination, "--base-url", base_url)
    assert result.exit_code == 2
    assert "checksum mismatch" in result.output
    assert not (tmp_path / "out").exists()


def test_corrupted_archive_not_kept(served, tmp_path, cli):
    source, base_url = served
    (source / "annotations" / "annotations_trainval2017.zip").write_bytes(b"not the archive")
    destination = tmp_path / "coco-mini"
    archive_folder = tmp_path / "archives"
    result = cli("download-coco-mini", destination, "--base-url", base_url, "--archives", archive_folder)
    assert result.exit_code == 2
    assert not destination.exists()
    assert list(archive_folder.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archives", "source"]


def test_missing_photo_exits_2(served, tmp_path, cli, monkeypatch):
    _, base_url = served
    monkeypatch.setattr(coco, "VAL2017_IMAGE_IDS", IMAGE_IDS + (999999,))
    destination = tmp_path / "coco-mini"
    result = cli("download-coco-mini", destination, "--base-url", base_url)
    assert result.exit_code == 2
    assert "999999" in result.output
    assert not destination.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_nonempty_destination_rejected(tmp_path, cli):
    destination = tmp_path / "coco-mini"
    destination.mkdir()
    (destination / "notes.txt").write_text("keep me")
    result = cli("download-coco-mini", destination, "--base-url", (tmp_path / "absent").as_uri())
    assert result.exit_code == 2
    assert "is not empty" in result.output
    assert (destination / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in destination.iterdir()) == ["notes.txt"]


def test_missing_local_source_exits_2(tmp_path, cli):
    destination = tmp_path / "coco-mini"
    result = cli("download-coco-mini", destination, "--base-url", (tmp_path / "absent").as_uri())
    assert result.exit_code == 2
    assert "cannot read" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("base_url", ["", "images.cocodataset.org/"])
def test_base_url_without_scheme_exits_2(tmp_path, cli, base_url):
    result = cli("download-coco-mini", tmp_path / "coco-mini", "--base-url", base_url)
    assert result.exit_code == 2
    assert "no supported scheme" in result.output
    assert list(tmp_path.iterdir()) == []


def test_kept_archives_reused_with_force(served, tmp_path, cli):
    source, base_url = served
    destination = tmp_path / "coco-mini"
    archive_folder = tmp_path / "archives"
    first = cli("download-coco-mini", destination, "--base-url", base_url, "--archives", archive_folder)
    assert first.exit_code == 0, first.output
    assert sorted(p.name for p in archive_folder.iterdir()) == ["annotations_trainval2017.zip", "val2017.zip"]
    (destination / "stale.txt").write_text("from before")

    for archive in (source / "annotations" / "annotations_trainval2017.zip", source / "zips" / "val2017.zip"):
        archive.unlink()
    second = cli("download-coco-mini", destination, "--base-url", base_url, "--archives", archive_folder, "--force")
    assert second.exit_code == 0, second.output
    assert not (destination / "stale.txt").exists()
    assert len(list((destination / "images").iterdir())) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archives", "coco-mini", "source"]


def test_manifest_matches_shared_val_photos(shared_data):
    rows, _ = shared_rows(shared_data)
    expected = sorted(i for i, row in rows.items() if row["coco_split"] == "val2017")
    assert list(coco.VAL2017_IMAGE_IDS) == expected
