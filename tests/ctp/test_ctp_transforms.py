"""Clip transforms against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmtk.ctp import transforms as T


def ramp_clip(frames=3, height=40, width=60):
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij")
    base = torch.stack([xs * 2, ys * 3, xs + ys])  # [3, H, W]
    return torch.stack([base + 10 * t for t in range(frames)]).clamp(0, 255)


def test_short_side_crop_equals_window_resize():
    clip = ramp_clip()
    rng = np.random.default_rng(7)
    out = T.random_short_side_crop(clip, [48], 32, rng)

    replay = np.random.default_rng(7)
    replay.integers(1)  # the short-side draw
    window = round(32 * 40 / 48)
    top = int(replay.integers(0, 40 - window + 1))
    left = int(replay.integers(0, 60 - window + 1))
    expected = torch.nn.functional.interpolate(clip[..., top : top + window, left : left + window], size=(32, 32), mode="bilinear", align_corners=False)
    assert out.shape == (3, 3, 32, 32)
    assert torch.allclose(out, expected)


def test_short_side_crop_without_scaling_is_plain_crop():
    clip = ramp_clip()
    out = T.random_short_side_crop(clip, [40], 40, np.random.default_rng(0))
    left = int(out[0, 0, 0, 0].item() / 2)  # channel 0 is 2x
    assert torch.equal(out, clip[..., :, left : left + 40])


def test_resize_short_side_keeps_aspect():
    assert T.resize_short_side(ramp_clip(), 20).shape == (3, 3, 20, 30)
    assert T.resize_short_side(ramp_clip(height=60, width=40), 20).shape == (3, 3, 30, 20)


def test_resize_of_linear_ramp_is_linear():
    clip = ramp_clip(frames=1, height=8, width=8)
    up = T.resize(clip, 16, 16)  # half-pixel centres: x_src = (x + 0.5) / 2 - 0.5
    xs = (torch.arange(16, dtype=torch.float32) + 0.5) / 2 - 0.5
    assert torch.allclose(up[0, 0, 5, 1:-1], 2 * xs[1:-1], atol=1e-5)


def test_strong_shrinking_is_antialiased():
    stripes = torch.zeros(1, 3, 30, 30)
    stripes[..., ::2] = 255.0  # one-pixel stripes alias badly when subsampled
    small = T.resize(stripes, 10, 10)[..., 1:-1]  # plain bilinear would sample columns 4, 7, ...: 255, 0, ...
    assert torch.allclose(small, torch.full_like(small, 127.5), atol=15.0)


def test_center_crop_and_flip():
    clip = ramp_clip()
    center = T.center_crop(clip, 20)
    assert torch.equal(center, clip[..., 10:30, 20:40])
    flipped = T.hflip(clip)
    assert torch.equal(flipped[..., 0], clip[..., -1])


def test_normalize_round_trip_and_layout():
    frames = np.random.default_rng(0).integers(0, 256, (4, 8, 10, 3), dtype=np.uint8)
    clip = T.to_float_clip(frames)
    assert clip.shape == (4, 3, 8, 10)
    normalised = T.normalize(clip)
    assert normalised.shape == (3, 4, 8, 10)
    assert normalised[0, 1, 2, 3].item() == pytest.approx((frames[1, 2, 3, 0] - 123.675) / 58.395, rel=1e-5)
    assert np.array_equal(T.denormalize(normalised).numpy(), frames)


def test_brightness_and_contrast_values():
    clip = torch.full((2, 3, 4, 4), 100.0)
    clip[:, :, :2] = 50.0  # mean luma 75
    out = T.adjust_brightness_contrast(clip, brightness=torch.tensor([10.0, -20.0]), contrast=torch.tensor([1.0, 2.0]))
    assert torch.allclose(out[0], clip[0] + 10)
    # Frame 1: values 30 and 80 around mean 55, doubled: 5 and 105.
    assert out[1, 0, 0, 0].item() == pytest.approx(5.0)
    assert out[1, 0, 3, 0].item() == pytest.approx(105.0)


def test_hue_rotation_keeps_gray_and_luma():
    gray = torch.full((1, 3, 2, 2), 77.0)
    assert torch.allclose(T.adjust_hue_saturation(gray, hue_degrees=30.0), gray, atol=1e-3)
    colour = torch.tensor([200.0, 60.0, 90.0]).view(1, 3, 1, 1)
    rotated = T.adjust_hue_saturation(colour, hue_degrees=20.0)
    assert T.grayscale(rotated).item() == pytest.approx(T.grayscale(colour).item(), abs=1e-3)
    assert not torch.allclose(rotated, colour)
    desaturated = T.adjust_hue_saturation(colour, saturation=0.0)
    assert torch.allclose(desaturated, T.grayscale(colour).expand(1, 3, 1, 1))


def test_multi_scale_crop_shape():
    clip = ramp_clip()
    out = T.multi_scale_crop(clip, [(32, 44), (36, 50)], 32, np.random.default_rng(0))
    assert out.shape == (3, 3, 32, 32)
