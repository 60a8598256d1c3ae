"""RoIAlign against analytic cases and an independent per-sample loop."""

from __future__ import annotations

import pytest
import torch

from mmtk.ctp.roi_align import roi_align


def reference_roi_align(features, rois, pooled, scale, ratio, aligned):
    """Per-sample loop in float64 following the mmcv/torchvision CPU rule."""
    _, channels, height, width = features.shape
    out = torch.zeros(rois.shape[0], channels, pooled, pooled, dtype=torch.float64)
    offset = 0.5 if aligned else 0.0
    for n, roi in enumerate(rois.tolist()):
        b = int(roi[0])
        x1, y1, x2, y2 = (v * scale - offset for v in roi[1:])
        roi_w, roi_h = x2 - x1, y2 - y1
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_w, bin_h = roi_w / pooled, roi_h / pooled
        for ph in range(pooled):
            for pw in range(pooled):
                total = torch.zeros(channels, dtype=torch.float64)
                for iy in range(ratio):
                    for ix in range(ratio):
                        y = y1 + ph * bin_h + (iy + 0.5) * bin_h / ratio
                        x = x1 + pw * bin_w + (ix + 0.5) * bin_w / ratio
                        if y < -1.0 or y > height or x < -1.0 or x > width:
                            continue
                        y, x = max(y, 0.0), max(x, 0.0)
                        y_low, x_low = int(y), int(x)
                        if y_low >= height - 1:
                            y_low = y_high = height - 1
                            y = float(y_low)
                        else:
                            y_high = y_low + 1
                        if x_low >= width - 1:
                            x_low = x_high = width - 1
                            x = float(x_low)
                        else:
                            x_high = x_low + 1
                        ly, lx = y - y_low, x - x_low
                        hy, hx = 1 - ly, 1 - lx
                        f = features[b].double()
                        total += hy * hx * f[:, y_low, x_low] + hy * lx * f[:, y_low, x_high] + ly * hx * f[:, y_high, x_low] + ly * lx * f[:, y_high, x_high]
                out[n, :, ph, pw] = total / (ratio * ratio)
    return out


def test_constant_map_gives_constant_output():
    features = torch.full((1, 2, 10, 12), 3.5, dtype=torch.float64)
    rois = torch.tensor([[0, 8.0, 8.0, 60.0, 50.0], [0, 20.0, 4.0, 44.0, 70.0]], dtype=torch.float64)
    out = roi_align(features, rois, 5, spatial_scale=1 / 8, sampling_ratio=2, aligned=True)
    assert torch.allclose(out, torch.full_like(out, 3.5), atol=1e-12)


def test_ramp_bins_equal_ramp_at_bin_centres():
    height, width = 16, 20
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij")
    features = (2.0 * xs - 3.0 * ys + 7.0)[None, None]  # F(y, x) = 2x - 3y + 7
    x1, y1, x2, y2 = 20.0, 24.0, 100.0, 96.0  # input pixels; scale 1/8 keeps every sample inside
    rois = torch.tensor([[0, x1, y1, x2, y2]], dtype=torch.float64)
    out = roi_align(features, rois, 5, spatial_scale=1 / 8, sampling_ratio=2, aligned=True)[0, 0]

    # aligned=True: feature coordinate = pixel * scale - 0.5.
    fx1, fy1 = x1 / 8 - 0.5, y1 / 8 - 0.5
    bin_w, bin_h = (x2 - x1) / 8 / 5, (y2 - y1) / 8 / 5
    for ph in range(5):
        for pw in range(5):
            cx = fx1 + (pw + 0.5) * bin_w
            cy = fy1 + (ph + 0.5) * bin_h
            assert out[ph, pw].item() == pytest.approx(2 * cx - 3 * cy + 7, abs=1e-10)


def test_aligned_flag_shifts_by_half_pixel():
    ys, xs = torch.meshgrid(torch.arange(8, dtype=torch.float64), torch.arange(8, dtype=torch.float64), indexing="ij")
    features = xs[None, None].clone()  # F = x
    rois = torch.tensor([[0, 2.0, 2.0, 6.0, 6.0]], dtype=torch.float64)
    aligned = roi_align(features, rois, 1, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    legacy = roi_align(features, rois, 1, spatial_scale=1.0, sampling_ratio=2, aligned=False)
    assert aligned.item() == pytest.approx(3.5, abs=1e-12)  # box centre 4 minus the half-pixel offset
    assert legacy.item() == pytest.approx(4.0, abs=1e-12)


def test_legacy_mode_widens_tiny_boxes():
    torch.manual_seed(1)
    features = torch.randn(1, 1, 6, 6, dtype=torch.float64)
    rois = torch.tensor([[0, 2.2, 2.2, 2.4, 2.4]], dtype=torch.float64)
    expected = reference_roi_align(features, rois, 2, 1.0, 2, aligned=False)
    out = roi_align(features, rois, 2, spatial_scale=1.0, sampling_ratio=2, aligned=False)
    assert torch.allclose(out, expected, atol=1e-10)


@pytest.mark.parametrize("aligned", [True, False])
def test_matches_reference_loop_including_borders(aligned):
    torch.manual_seed(0)
    features = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    rois = torch.tensor(
        [
            [0, 4.0, 4.0, 40.0, 30.0],
            [1, -12.0, -6.0, 20.0, 18.0],  # beyond the top-left border
            [1, 50.0, 40.0, 80.0, 64.0],  # beyond the bottom-right border
            [0, 0.0, 0.0, 72.0, 56.0],  # the whole map
            [1, 30.0, 10.0, 31.0, 11.0],  # smaller than one feature pixel
        ],
        dtype=torch.float64,
    )
    expected = reference_roi_align(features, rois, 5, 1 / 8, 2, aligned)
    out = roi_align(features, rois, 5, spatial_scale=1 / 8, sampling_ratio=2, aligned=aligned)
    assert torch.allclose(out, expected, atol=1e-10, rtol=0)


def test_gradients_reach_features():
    torch.manual_seed(0)
    features = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 3.0, 2.0, 30.0, 25.0], [0, -4.0, 1.0, 12.0, 44.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: roi_align(f, rois, 3, 1 / 8, 2, True), (features,))
