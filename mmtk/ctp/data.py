"""Data sets of video clips read from the HDF5 clip cache.

:class:`ProxyClips` yields proxy-task samples (pasted clip, boxes) for
pretraining; :class:`LabelledClips` yields augmented or multi-clip test
views with a class label for evaluation. Both draw their randomness from
numpy's global generator, which the shared trainer seeds per sample, so a
sample depends only on the run seed and its position in the data order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mmtk.core.errors import DataError
from mmtk.core.logging import get_logger
from mmtk.core.recipe import param
from mmtk.ctp import transforms as T
from mmtk.ctp.proxy import ProxyTaskConfig, make_proxy_sample
from mmtk.ctp.video import (
    ClipCache,
    VideoInfo,
    VideoRecord,
    build_clip_cache,
    cache_matches,
    fit_stride,
    list_video_folder,
    probe_video,
    read_hmdb51_split,
    read_ucf101_split,
    sample_clip_indices,
)

log = get_logger(__name__)


@dataclass
class VideoDataConfig:
    """Location and layout of a video data set."""

    root: Optional[Path] = param(None, help="folder of videos; null uses the tool's bundled real videos")
    layout: Literal["folder", "ucf101", "hmdb51"] = param("folder", help="folder: every video under root, unlabelled; ucf101 or hmdb51: split lists in 'splits'")
    splits: Optional[Path] = param(None, help="folder of split lists (ucf101: classInd.txt, trainlist0K.txt, testlist0K.txt; hmdb51: <class>_test_split<K>.txt)")
    split: int = param(1, min=1, max=3, help="split number K")
    cache: Optional[Path] = param(None, help="HDF5 clip cache file; null writes clip-cache.h5 in the run folder. An up-to-date cache is reused")


def read_records(config: VideoDataConfig, root: Path, subset: Literal["train", "test"]) -> tuple[list[VideoRecord], list[str]]:
    """List the videos of ``subset`` under the configured layout; returns (records, class names)."""
    if root.is_file():
        raise DataError(f"data.root={root} is a file, not a folder. Set data.root to the folder of videos that contains it, {root.parent}.")
    if config.layout == "folder":
        return list_video_folder(root), []
    if config.splits is None:
        raise DataError(f"data.layout={config.layout} needs data.splits, the folder of split lists.")
    if not config.splits.is_dir():
        raise DataError(f"split folder not found: {config.splits}. Set data.splits to the folder of split lists.")
    reader = read_ucf101_split if config.layout == "ucf101" else read_hmdb51_split
    return reader(root, config.splits, subset, config.split)


def probe_records(records: Sequence[VideoRecord], min_frames: int) -> list[VideoInfo]:
    """Probe every video, raising DataError for an unreadable file or one shorter than ``min_frames`` frames."""
    infos = []
    for record in records:
        info = probe_video(record.path)
        if info.num_frames < min_frames:
            raise DataError(f"video {record.path} has {info.num_frames} frames, fewer than the {min_frames} that one clip needs. Lower the clip length or remove the video.")
        infos.append(info)
    return infos


def check_cache_path(path: Path) -> None:
    """Raise DataError if ``path`` cannot take a clip cache: a folder, or an existing file that is not HDF5.

    An existing HDF5 file is overwritten when it does not match the data, so
    this check keeps a mistyped path from replacing an unrelated file.
    """
    import h5py

    if path.is_dir():
        raise DataError(f"data.cache={path} is a folder. Set data.cache to an .h5 file path, or null for one in the run folder.")
    if path.exists() and not h5py.is_hdf5(path):
        raise DataError(f"data.cache={path} exists and is not an HDF5 file, so it is not a clip cache. Delete it or set data.cache to another path.")


def open_cache(path: Path, records: Sequence[VideoRecord], short_side: int) -> ClipCache:
    """Reuse the cache at ``path`` if it matches ``records``, else decode all videos into it."""
    if cache_matches(path, records, short_side):
        log.info("reusing clip cache %s", path)
    else:
        log.info("decoding %d videos into clip cache %s", len(records), path)
        build_clip_cache(path, records, short_side)
    return ClipCache(path)


def _numpy_generator() -> np.random.Generator:
    # The trainer seeds numpy's global generator per sample; derive a Generator from it.
    return np.random.default_rng(np.random.randint(0, 2**31 - 1))


@dataclass(frozen=True)
class FrameRange:
    """Frames [start, stop) of cached video ``video`` that a data set may sample from."""

    video: int
    start: int
    stop: int


class ProxyClips(Dataset):
    """Proxy-task samples from cached videos; item i comes from range ``i % len(ranges)``.

    ``clips_per_range`` sets the epoch length (items per range). Each item
    draws a random stride from ``strides``, a jittered clip of
    ``num_frames`` frames and a proxy sample of ``crop_size`` pixels.
    """

    def __init__(
        self,
        cache: ClipCache,
        ranges: Sequence[FrameRange],
        num_frames: int,
        strides: Sequence[int],
        crop_size: int,
        short_sides: Sequence[int],
        proxy: ProxyTaskConfig,
        clips_per_range: int = 1,
        fixed_seed: int | None = None,
    ) -> None:
        self.cache = cache
        self.ranges = list(ranges)
        self.num_frames = num_frames
        self.strides = list(strides)
        self.crop_size = crop_size
        self.short_sides = list(short_sides)
        self.proxy = proxy
        self.clips_per_range = clips_per_range
        self.fixed_seed = fixed_seed

    def __len__(self) -> int:
        return len(self.ranges) * self.clips_per_range

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.fixed_seed, index]) if self.fixed_seed is not None else _numpy_generator()
        frame_range = self.ranges[index % len(self.ranges)]
        stride = int(rng.choice(self.strides))
        indices = sample_clip_indices(frame_range.stop - frame_range.start, self.num_frames, stride, rng, mode="random", jitter=True)[0]
        frames = self.cache.read(frame_range.video, indices + frame_range.start)  # [T, H, W, 3]
        return make_proxy_sample(frames, rng, self.proxy, self.crop_size, self.short_sides)


@dataclass
class ClipViewConfig:
    """Clip geometry and augmentation for action classification (sizes as (height, width) in pixels)."""

    num_frames: int = param(16, min=1, help="frames per clip")
    stride: int = param(2, min=1, help="frame stride inside a clip")
    crop_size: int = param(112, min=8, help="square crop in pixels")
    train_sizes: list[list[int]] = param(default_factory=lambda: [[112, 149], [128, 171], [144, 192]], help="(height, width) resize choices before the random training crop")
    test_size: list[int] = param(default_factory=lambda: [128, 171], help="(height, width) resize before the centre test crop")
    test_clips: int = param(10, min=1, help="uniformly spaced clips per test video; their scores are averaged")
    flip_prob: float = param(0.35, min=0, max=1, help="horizontal flip probability in training")
    jitter_prob: float = param(0.2, min=0, max=1, help="probability of each of brightness, contrast and hue jitter in training")

    def __post_init__(self) -> None:
        for size in [*self.train_sizes, self.test_size]:
            if len(size) != 2 or min(size) < self.crop_size:
                raise ValueError(f"resize sizes must be (height, width) pairs no smaller than crop_size={self.crop_size}, got {size}")

    @property
    def cache_short_side(self) -> int:
        """Short side the cache must store so that no resize enlarges frames needlessly."""
        return max(size[0] for size in [*self.train_sizes, self.test_size])


class LabelledClips(Dataset):
    """Clips with class labels from cached videos.

    ``mode="train"``: one random augmented clip per item, ``{"clip": [3, T, S, S], "label"}``.
    ``mode="test"``: ``test_clips`` uniformly spaced centre-cropped clips, ``{"clip": [K, 3, T, S, S], "label"}``.
    """

    def __init__(self, cache: ClipCache, labels: Sequence[int], view: ClipViewConfig, mode: Literal["train", "test"]) -> None:
        self.cache = cache
        self.labels = list(labels)
        self.view = view
        self.mode = mode

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        view = self.view
        num_frames = self.cache.num_frames(index)
        label = torch.tensor(self.labels[index])
        if self.mode == "test":
            indices = sample_clip_indices(num_frames, view.num_frames, view.stride, mode="uniform", num_clips=view.test_clips)
            clips = []
            for row in indices:
                clip = T.to_float_clip(self.cache.read(index, row))  # [T, 3, H, W]
                clip = T.center_crop(T.resize(clip, *view.test_size), view.crop_size)
                clips.append(T.normalize(clip))
            return {"clip": torch.stack(clips), "label": label}  # [K, 3, T, S, S]

        rng = _numpy_generator()
        stride = fit_stride(num_frames, view.num_frames, view.stride)
        indices = sample_clip_indices(num_frames, view.num_frames, stride, rng, mode="random")[0]
        clip = T.to_float_clip(self.cache.read(index, indices))
        clip = T.multi_scale_crop(clip, [tuple(s) for s in view.train_sizes], view.crop_size, rng)
        if rng.uniform() < view.flip_prob:
            clip = T.hflip(clip)
        brightness = torch.full((clip.shape[0],), float(rng.uniform(-30, 30))) if rng.uniform() < view.jitter_prob else None
        contrast = torch.full((clip.shape[0],), float(1 + rng.uniform(-0.12, 0.12))) if rng.uniform() < view.jitter_prob else None
        if brightness is not None or contrast is not None:
            clip = T.adjust_brightness_contrast(clip, brightness, contrast)
        if rng.uniform() < view.jitter_prob:
            clip = T.adjust_hue_saturation(clip, hue_degrees=float(rng.uniform(-24, 24)))
        return {"clip": T.normalize(clip), "label": label}
