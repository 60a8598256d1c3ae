"""Synthetic videos for the ctp tests: moving random textures encoded with PyAV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmtk.ctp.video import encode_video

FRAMES = 24
HEIGHT, WIDTH = 48, 64


def moving_texture(seed: int, frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """Return ``uint8`` frames [T, H, W, 3] of a smooth random texture drifting by (2, 1) px per frame."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 4 + frames, width // 4 + frames, 3)).astype(np.float64)
    texture = np.kron(coarse, np.ones((4, 4, 1)))  # blocks of 4x4 px survive compression well
    return np.stack([texture[t : t + height, 2 * t : 2 * t + width] for t in range(frames)]).astype(np.uint8)


def write_ucf_layout(root: Path, videos_per_class: int = 3, frames: int = FRAMES) -> tuple[Path, Path]:
    """Write two classes of synthetic videos and UCF101 split lists; returns (video root, split folder)."""
    video_root = root / "videos"
    splits = root / "splits"
    splits.mkdir(parents=True)
    classes = ["Drift", "Still"]
    (splits / "classInd.txt").write_text("1 Drift\n2 Still\n")
    train, test = [], []
    for label, name in enumerate(classes):
        for k in range(videos_per_class):
            frames_array = moving_texture(10 * label + k, frames)
            if name == "Still":
                frames_array = np.repeat(frames_array[:1], frames, axis=0)
            relative = f"{name}/v_{name}_g{k:02d}.mp4"
            encode_video(video_root / relative, frames_array)
            if k == videos_per_class - 1:
                test.append(relative)
            else:
                train.append(f"{relative} {label + 1}")
    (splits / "trainlist01.txt").write_text("\n".join(train) + "\n")
    (splits / "testlist01.txt").write_text("\n".join(test) + "\n")
    return video_root, splits


@pytest.fixture(scope="session")
def ucf_dataset(tmp_path_factory) -> tuple[Path, Path]:
    """A UCF101-layout data set of 6 synthetic videos (2 classes, 24 frames of 64x48 px)."""
    return write_ucf_layout(tmp_path_factory.mktemp("ucf"))


@pytest.fixture(scope="session")
def video_folder(tmp_path_factory) -> Path:
    """A folder of 3 synthetic videos (24 frames of 64x48 px)."""
    root = tmp_path_factory.mktemp("videos")
    for k in range(3):
        encode_video(root / f"clip{k}.mp4", moving_texture(100 + k))
    return root
