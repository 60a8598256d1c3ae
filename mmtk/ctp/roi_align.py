"""RoIAlign in plain torch, with the sampling and boundary rules of mmcv and torchvision.

Each box is split into P x P bins. Each bin averages g x g bilinear samples
placed at bin_start + (i + 0.5) * bin_size / g. A sample beyond -1 or beyond
the feature size on either axis contributes 0; otherwise its coordinate is
clamped into [0, size - 1]. Because bilinear sampling is separable, the
samples of one box are a product of two sparse interpolation matrices with
the feature map: out = Wy @ F @ Wx^T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _interpolation_matrix(coords: torch.Tensor, size: int) -> torch.Tensor:
    """Build bilinear weights [N, S, size] that sample positions ``coords`` [N, S] on one axis."""
    valid = (coords >= -1.0) & (coords <= size)
    coords = coords.clamp(min=0)
    low = coords.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    coords = torch.where(at_edge, low.to(coords.dtype), coords)

    frac = coords - low.to(coords.dtype)
    weight_low = (1 - frac) * valid
    weight_high = frac * valid
    matrix = F.one_hot(low, size).to(coords.dtype) * weight_low[..., None]
    matrix = matrix + F.one_hot(high, size).to(coords.dtype) * weight_high[..., None]
    return matrix  # [N, S, size]


def roi_align(
    features: torch.Tensor,
    rois: torch.Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 2,
    aligned: bool = True,
) -> torch.Tensor:
    """Pool ``features`` [B, C, H, W] inside ``rois`` [N, 5] = (batch index, x1, y1, x2, y2) to [N, C, Ph, Pw].

    Box coordinates are in input pixels and are multiplied by ``spatial_scale``.
    ``aligned=True`` shifts them by -0.5 so that pixel centres line up
    (continuous coordinates). ``aligned=False`` keeps the legacy rule that
    forces each box to be at least 1 feature pixel wide and high.
    ``sampling_ratio`` (g >= 1) is the number of samples per bin and axis.
    Gradients flow to ``features``, not to ``rois``.
    """
    if sampling_ratio < 1:
        raise ValueError("sampling_ratio must be >= 1 (adaptive sampling is not implemented)")
    pooled_h, pooled_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    _, _, height, width = features.shape
    dtype = features.dtype
    rois = rois.detach().to(dtype)
    offset = 0.5 if aligned else 0.0

    batch_index = rois[:, 0].long()
    x1 = rois[:, 1] * spatial_scale - offset
    y1 = rois[:, 2] * spatial_scale - offset
    x2 = rois[:, 3] * spatial_scale - offset
    y2 = rois[:, 4] * spatial_scale - offset
    roi_w = x2 - x1
    roi_h = y2 - y1
    if not aligned:
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    bin_w = roi_w / pooled_w  # [N]
    bin_h = roi_h / pooled_h

    # Sample positions along each axis: bin p, sample i -> start + p*bin + (i + 0.5)*bin/g.
    g = sampling_ratio
    steps_w = (torch.arange(pooled_w, dtype=dtype)[:, None] + (torch.arange(g, dtype=dtype)[None, :] + 0.5) / g).reshape(-1)  # [Pw*g]
    steps_h = (torch.arange(pooled_h, dtype=dtype)[:, None] + (torch.arange(g, dtype=dtype)[None, :] + 0.5) / g).reshape(-1)  # [Ph*g]
    xs = x1[:, None] + steps_w[None, :].to(features.device) * bin_w[:, None]  # [N, Pw*g]
    ys = y1[:, None] + steps_h[None, :].to(features.device) * bin_h[:, None]  # [N, Ph*g]

    weights_x = _interpolation_matrix(xs, width)  # [N, Pw*g, W]
    weights_y = _interpolation_matrix(ys, height)  # [N, Ph*g, H]
    samples = torch.einsum("nph,nchw,nqw->ncpq", weights_y, features[batch_index], weights_x)  # [N, C, Ph*g, Pw*g]

    num_rois, channels = samples.shape[:2]
    samples = samples.reshape(num_rois, channels, pooled_h, g, pooled_w, g)
    return samples.mean(dim=(3, 5))  # [N, C, Ph, Pw]


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align` with fixed output size, scale, sampling ratio and alignment."""

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float, sampling_ratio: int = 2, aligned: bool = True) -> None:
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return roi_align(features, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
