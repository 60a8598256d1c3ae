"""``mmtk download-coco-mini``: rebuild the coco-mini photo set from COCO's official archives.

COCO publishes its 2017 data as zip archives on ``images.cocodataset.org``.
:data:`COCO_ARCHIVES` contains their MD5 sums as several dataset loaders list
them (PaddleDetection's COCO reader tests, the R ``torchvision`` package's
COCO dataset). The download checks each archive against its MD5 before
opening it. The shrunk JPEGs that come out have no published sum to check,
because re-encoded JPEG bytes can differ between Pillow and libjpeg versions.

From the archives the tool takes the val2017 photos in
:data:`VAL2017_IMAGE_IDS` (the 159 val2017 photos of coco-mini), shrinks each
so its longer side is 256 px (Lanczos, JPEG quality 90, ICC profile kept, no
enlarging), and writes the coco-mini layout:

- ``images/<image_id>.jpg``;
- ``captions.jsonl``: one ``{"image_id", "file", "coco_split", "license_id",
  "captions"}`` object per photo, sorted by id, captions in annotation-id order;
- ``images.csv``: size, original size, Flickr licence and URLs per photo;
- ``MD5SUMS.images``: the MD5 of every JPEG written (``md5sum -c`` in ``images/``).

The 80 train2017 photos of coco-mini are not included, because they would
need the 18 GB train2017 archive. Everything is written to a staging folder
next to the destination and renamed into place at the end, so a failed run
leaves no partial folder.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import tempfile
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from mmtk.core.errors import DataError, InputError, MmtkError
from mmtk.core.logging import get_logger

log = get_logger(__name__)

COCO_BASE_URL = "http://images.cocodataset.org/"
LONGER_SIDE = 256
JPEG_QUALITY = 90
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Archive:
    """One published COCO archive: its path below the base URL, its MD5 and its size in bytes (an estimate for progress logs)."""

    path: str
    md5: str
    approx_bytes: int


# MD5 sums as listed by PaddleDetection (ppdet/data/tests, COCO_VAL_MD5SUM and
# COCO_ANNO_MD5SUM) and by mlverse/torchvision (R/dataset-coco.R).
COCO_ARCHIVES: dict[str, Archive] = {
    "annotations": Archive("annotations/annotations_trainval2017.zip", "f4bbac642086de4f52a3fdda2de5fa2c", 252_907_541),
    "val2017": Archive("zips/val2017.zip", "442b8da7639aecaf257c1dceb8ba8c80", 815_585_330),
}
CAPTIONS_MEMBER = "annotations/captions_val2017.json"
IMAGE_MEMBER = "val2017/{image_id:012d}.jpg"

# The val2017 image ids of coco-mini, in ascending order.
VAL2017_IMAGE_IDS: tuple[int, ...] = (
    139, 802, 11813, 12280, 18575, 19221, 20247, 22192, 22892, 30213, 34417, 57597, 59598, 62554, 66841, 73326,
    78915, 92660, 99053, 101780, 101787, 105912, 106235, 109313, 113354, 116479, 117425, 117645, 126107, 128051,
    128598, 135561, 136334, 142585, 151938, 153797, 155341, 160012, 160556, 161044, 163951, 165518, 167572, 172648,
    174231, 177861, 181303, 183709, 189775, 192699, 194875, 199055, 205401, 211042, 214753, 215778, 217285, 229358,
    229997, 231125, 234757, 235064, 237517, 241668, 244592, 249025, 252332, 253695, 255165, 261712, 262227, 262440,
    262682, 269196, 269314, 273232, 275791, 286458, 288685, 290843, 296222, 301061, 310200, 311002, 312237, 312489,
    324258, 328683, 334719, 338905, 341719, 343803, 344100, 347254, 349860, 350679, 354072, 357081, 357501, 358427,
    359219, 361919, 367095, 368212, 369771, 370208, 377575, 378605, 389684, 391648, 394940, 397133, 397681, 403353,
    405279, 406129, 407574, 423617, 425226, 427034, 431848, 434204, 435081, 435206, 439180, 453302, 458045, 460229,
    463690, 475678, 476704, 482585, 488673, 501368, 505573, 508602, 511599, 516916, 519208, 519611, 527220, 530836,
    531134, 536038, 539445, 540280, 546826, 549055, 551780, 552775, 553664, 557172, 565607, 565776, 568290, 570448,
    576031, 577932, 580294,
)

CSV_COLUMNS = (
    "image_id", "file", "coco_split", "coco_file_name", "width", "height", "orig_width", "orig_height",
    "license_id", "license_name", "license_url", "flickr_url", "coco_url", "date_captured",
)


URL_SCHEMES = ("http", "https", "ftp", "file")


def fetch_archive(url: str, target: Path, expected_md5: str, timeout_s: float = 60.0) -> Path:
    """Stream ``url`` into ``target`` while hashing it; raise DataError and delete the file when the MD5 differs.

    A failed transfer raises MmtkError (exit code 1) and leaves no file.
    """
    partial = target.with_name(target.name + ".part")
    digest = hashlib.md5()
    received = 0
    log.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(partial, "wb") as out:  # noqa: S310 - fixed COCO URL or a user-given base URL
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        if url.startswith("file:"):
            raise InputError(f"cannot read {url}: {exc}. Check that --base-url names the local folder that contains COCO's archive paths.") from exc
        raise MmtkError(f"download of {url} failed after {received} bytes: {exc}. Check the network connection or pass another --base-url.") from exc
    if digest.hexdigest() != expected_md5:
        partial.unlink(missing_ok=True)
        raise DataError(f"checksum mismatch for {url}: MD5 {digest.hexdigest()} over {received} bytes, expected {expected_md5}. The file was deleted; download again.")
    partial.replace(target)
    log.info("downloaded %s (%d bytes, MD5 matches)", url, received)
    return target


def file_md5(path: Path) -> str:
    """Return the hex MD5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def obtain_archive(name: str, base_url: str, folder: Path) -> Path:
    """Return archive ``name`` in ``folder``: reuse a file whose MD5 matches, else download it."""
    archive = COCO_ARCHIVES[name]
    target = folder / Path(archive.path).name
    if target.is_file():
        if file_md5(target) == archive.md5:
            log.info("reusing %s (MD5 matches)", target)
            return target
        log.warning("%s has another MD5 than the published one; downloading it again", target)
        target.unlink()
    log.info("fetching %s (about %d MB)", archive.path, archive.approx_bytes // 1_000_000)
    return fetch_archive(base_url + archive.path, target, archive.md5)


def read_caption_file(annotations: Path, image_ids: Iterable[int]) -> tuple[dict[int, dict[str, Any]], dict[int, list[str]], dict[int, dict[str, Any]]]:
    """Read images, captions (by annotation id) and licences for ``image_ids`` from the annotations archive.

    Raises DataError when the archive lacks the caption file or an image id
    has no image entry or no caption.
    """
    try:
        with zipfile.ZipFile(annotations) as archive:
            content = json.loads(archive.read(CAPTIONS_MEMBER))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {CAPTIONS_MEMBER} from {annotations}: {exc}. Delete the archive and download it again.") from exc

    requested = set(image_ids)
    images = {int(entry["id"]): entry for entry in content.get("images", []) if int(entry["id"]) in requested}
    licences = {int(entry["id"]): entry for entry in content.get("licenses", [])}
    caption_rows = sorted((int(a["id"]), int(a["image_id"]), str(a["caption"])) for a in content.get("annotations", []) if int(a["image_id"]) in requested)
    captions: dict[int, list[str]] = {}
    for _, image_id, caption in caption_rows:
        captions.setdefault(image_id, []).append(caption)

    missing = sorted(requested - images.keys()) + sorted(requested - captions.keys())
    if missing:
        raise DataError(f"{CAPTIONS_MEMBER} in {annotations} has no image entry or no caption for image ids {sorted(set(missing))[:10]}; it is not COCO's 2017 caption file.")
    return images, captions, licences


def shrink_jpeg(data: bytes, longer_side: int = LONGER_SIDE) -> tuple[bytes, tuple[int, int]]:
    """Shrink a JPEG so its longer side is ``longer_side`` px (never enlarging); return the new JPEG bytes and (width, height).

    The scale is ``longer_side / max(w, h)`` and the new size
    ``(round(w s), round(h s))``. Resampling is Lanczos in the photo's own
    mode (RGB or greyscale; other modes become RGB), saved at quality 90 with
    the photo's ICC profile and no EXIF.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        icc_profile = image.info.get("icc_profile")
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        width, height = image.size
        scale = min(1.0, longer_side / max(width, height))
        size = (round(width * scale), round(height * scale))
        if size != (width, height):
            image = image.resize(size, Image.Resampling.LANCZOS)
        out = io.BytesIO()
        options: dict[str, Any] = {"quality": JPEG_QUALITY}
        if icc_profile:
            options["icc_profile"] = icc_profile
        image.save(out, "JPEG", **options)
    return out.getvalue(), size


def write_coco_mini(folder: Path, annotations: Path, val_images: Path, image_ids: Iterable[int]) -> int:
    """Write the coco-mini layout for ``image_ids`` into the empty folder ``folder``; return the photo count."""
    image_ids = sorted(set(image_ids))
    images, captions, licences = read_caption_file(annotations, image_ids)
    (folder / "images").mkdir(parents=True)

    rows = []
    checksums = []
    try:
        archive = zipfile.ZipFile(val_images)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{val_images} is not a valid zip archive: {exc}. Delete it and download it again.") from exc
    with archive:
        for number, image_id in enumerate(image_ids, start=1):
            member = IMAGE_MEMBER.format(image_id=image_id)
            try:
                jpeg, (width, height) = shrink_jpeg(archive.read(member))
            except KeyError as exc:
                raise DataError(f"{val_images} does not contain {member}; it is not COCO's val2017 archive.") from exc
            except OSError as exc:
                raise DataError(f"cannot decode {member} in {val_images}: {exc}.") from exc
            (folder / "images" / f"{image_id}.jpg").write_bytes(jpeg)
            checksums.append((f"{image_id}.jpg", hashlib.md5(jpeg).hexdigest()))
            entry = images[image_id]
            licence = licences.get(int(entry.get("license", 0)), {})
            rows.append({
                "image_id": image_id, "file": f"images/{image_id}.jpg", "coco_split": "val2017", "coco_file_name": entry.get("file_name", ""),
                "width": width, "height": height, "orig_width": entry.get("width", ""), "orig_height": entry.get("height", ""),
                "license_id": entry.get("license", ""), "license_name": licence.get("name", ""), "license_url": licence.get("url", ""),
                "flickr_url": entry.get("flickr_url", ""), "coco_url": entry.get("coco_url", ""), "date_captured": entry.get("date_captured", ""),
            })
            if number % 50 == 0:
                log.info("shrunk %d of %d photos", number, len(image_ids))

    lines = [
        json.dumps({"image_id": r["image_id"], "file": r["file"], "coco_split": r["coco_split"], "license_id": r["license_id"], "captions": captions[r["image_id"]]})
        for r in rows
    ]
    (folder / "captions.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    with open(folder / "images.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    (folder / "MD5SUMS.images").write_text("".join(f"{digest}  {name}\n" for name, digest in sorted(checksums)), encoding="utf-8")
    return len(rows)


def download_coco_mini(destination: Path, base_url: str = COCO_BASE_URL, archives: Path | None = None, force: bool = False, image_ids: Iterable[int] | None = None) -> dict[str, Any]:
    """Download COCO's annotation and val2017 archives, check their MD5, and write the coco-mini layout into ``destination``.

    Args:
        destination: folder to create (must be absent or empty unless ``force``).
        base_url: URL that the archive paths of :data:`COCO_ARCHIVES` are
            appended to (default ``http://images.cocodataset.org/``; a
            ``file://`` URL reads local copies).
        archives: folder in which to keep the downloaded archives and reuse
            them on the next run; None downloads into a temporary folder that
            is deleted afterwards.
        force: replace an existing non-empty ``destination``.
        image_ids: val2017 image ids to take (None: :data:`VAL2017_IMAGE_IDS`, coco-mini's 159).

    Returns a summary with the destination, the photo count and the archives used.
    Raises InputError before any download for an unusable destination, and
    DataError (exit code 2) for a checksum mismatch or a malformed archive,
    in which case nothing is left in ``destination``.
    """
    destination = Path(destination)
    if destination.exists() and not destination.is_dir():
        raise InputError(f"download destination {destination} is a file, not a folder; pass a folder path.")
    if destination.is_dir() and any(destination.iterdir()) and not force:
        raise InputError(f"download destination {destination} is not empty; pass an empty or new folder, or --force to replace it.")
    scheme = urllib.parse.urlsplit(base_url).scheme
    if scheme not in URL_SCHEMES:
        raise InputError(f"--base-url {base_url!r} has no supported scheme; pass a URL that starts with one of {', '.join(s + '://' for s in URL_SCHEMES)}.")
    if not base_url.endswith("/"):
        base_url += "/"
    created = [folder for folder in [destination.parent, *destination.parent.parents] if not folder.exists()]
    destination.parent.mkdir(parents=True, exist_ok=True)

    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent))
    finished = False
    try:
        if archives is not None:
            archives.mkdir(parents=True, exist_ok=True)
            folder = archives
        else:
            folder = staging / "archives"
            folder.mkdir()
        annotations = obtain_archive("annotations", base_url, folder)
        val_images = obtain_archive("val2017", base_url, folder)

        output = staging / "coco-mini"
        output.mkdir()
        count = write_coco_mini(output, annotations, val_images, VAL2017_IMAGE_IDS if image_ids is None else image_ids)

        # Rename into place. An existing folder moves into the staging folder first, which is deleted below.
        if destination.exists():
            destination.replace(staging / "previous")
        output.replace(destination)
        finished = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not finished:
            for folder in created:  # nearest first, and only while empty
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
    log.info("wrote %d coco-mini photos into %s", count, destination)
    return {"destination": str(destination), "images": count, "archives": {name: base_url + archive.path for name, archive in COCO_ARCHIVES.items()}}
