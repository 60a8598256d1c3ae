"""The Catch-the-Patch head, box coding, loss and IoU.

The head collapses the backbone's time axis with one convolution and pools
each patch's first-frame box with RoIAlign. It regresses the patch's box in
every frame as offsets from that first box. The offsets are centre shifts in
pixels and log-size ratios, each divided by a fixed standard deviation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmtk.ctp.backbones import VideoResNet
from mmtk.ctp.roi_align import RoIAlign

TARGET_STD = (0.8, 0.8, 0.04, 0.04)  # divides (dx px, dy px, dlog w, dlog h)


def box_centers_sizes(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split boxes [..., 4] (x1, y1, x2, y2) into centres [..., 2] and sizes [..., 2] (sizes at least 1 px)."""
    centers = (boxes[..., :2] + boxes[..., 2:]) / 2
    sizes = (boxes[..., 2:] - boxes[..., :2]).clamp(min=1.0)
    return centers, sizes


def encode_boxes(boxes: torch.Tensor, std: tuple[float, ...] = TARGET_STD) -> torch.Tensor:
    """Encode per-frame boxes [N, T, 4] relative to frame 0 as normalised (dx, dy, dlog w, dlog h) [N, T, 4]."""
    centers, sizes = box_centers_sizes(boxes)
    shift = centers - centers[:, :1]  # [N, T, 2] pixels
    scale = torch.log(sizes / sizes[:, :1])  # [N, T, 2]
    return torch.cat([shift, scale], dim=-1) / boxes.new_tensor(std)


def decode_boxes(deltas: torch.Tensor, first_boxes: torch.Tensor, std: tuple[float, ...] = TARGET_STD) -> torch.Tensor:
    """Invert :func:`encode_boxes`: deltas [N, T, 4] and frame-0 boxes [N, 4] -> boxes [N, T, 4]."""
    deltas = deltas * deltas.new_tensor(std)
    centers0, sizes0 = box_centers_sizes(first_boxes[:, None])  # [N, 1, 2]
    centers = centers0 + deltas[..., :2]
    sizes = sizes0 * torch.exp(deltas[..., 2:])
    return torch.cat([centers - sizes / 2, centers + sizes / 2], dim=-1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Return the IoU of matching boxes a[..., 4] and b[..., 4] (x1, y1, x2, y2), elementwise."""
    top_left = torch.maximum(a[..., :2], b[..., :2])
    bottom_right = torch.minimum(a[..., 2:], b[..., 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(dim=-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(dim=-1)
    return intersection / (area_a + area_b - intersection).clamp(min=1e-6)


def ctp_loss(predictions: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Smooth-L1 (beta 1) between normalised deltas [N, T, 4], summed and divided by the N*T (patch, frame) pairs.

    Returns ``loss_ctr`` (x, y terms), ``loss_size`` (w, h terms) and their
    sum ``loss``. ``weights`` [N, T] default to 1 for every frame.
    """
    elementwise = F.smooth_l1_loss(predictions, targets, reduction="none", beta=1.0)  # [N, T, 4]
    if weights is not None:
        elementwise = elementwise * weights[..., None]
    pairs = max(1, targets.shape[0] * targets.shape[1])
    loss_ctr = elementwise[..., :2].sum() / pairs
    loss_size = elementwise[..., 2:].sum() / pairs
    return {"loss": loss_ctr + loss_size, "loss_ctr": loss_ctr, "loss_size": loss_size}


class CtPHead(nn.Module):
    """Predict normalised box deltas [N, T, 4] from a feature map and each patch's frame-0 box.

    Steps: a Conv3d over the whole feature time axis (with bias) and ReLU,
    then RoIAlign (``roi_size`` bins, ``1 / spatial_stride`` scale, 2 samples,
    aligned), then flatten, FC ``hidden``, ReLU and FC ``num_frames * 4``. Both
    FCs start from N(0, ``init_std``) weights and zero biases.
    """

    def __init__(self, in_channels: int, feature_frames: int, num_frames: int, spatial_stride: int, hidden: int = 512, roi_size: int = 5, init_std: float = 0.001) -> None:
        super().__init__()
        self.num_frames = num_frames
        self.temporal = nn.Conv3d(in_channels, in_channels, (feature_frames, 1, 1))
        self.roi_align = RoIAlign(roi_size, spatial_scale=1.0 / spatial_stride, sampling_ratio=2, aligned=True)
        self.fc1 = nn.Linear(in_channels * roi_size * roi_size, hidden)
        self.fc2 = nn.Linear(hidden, num_frames * 4)
        nn.init.kaiming_normal_(self.temporal.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.temporal.bias)
        for fc in (self.fc1, self.fc2):
            nn.init.normal_(fc.weight, std=init_std)
            nn.init.zeros_(fc.bias)

    def forward(self, features: torch.Tensor, first_boxes: torch.Tensor) -> torch.Tensor:
        batch, patches = first_boxes.shape[:2]
        x = F.relu(self.temporal(features)).squeeze(2)  # [B, C, T', H', W'] -> [B, C, H', W']
        batch_index = torch.arange(batch, device=x.device, dtype=x.dtype).repeat_interleave(patches)
        rois = torch.cat([batch_index[:, None], first_boxes.reshape(-1, 4).to(x.dtype)], dim=1)  # [B*P, 5]
        pooled = self.roi_align(x, rois)  # [B*P, C, 5, 5]
        hidden = F.relu(self.fc1(pooled.flatten(1)))
        return self.fc2(hidden).view(batch * patches, self.num_frames, 4)  # [B*P, T, 4]


class CtPModel(nn.Module):
    """Backbone plus head: clip [B, 3, T, H, W] and frame-0 boxes [B, P, 4] -> deltas [B*P, T, 4]."""

    def __init__(self, backbone: VideoResNet, num_frames: int, hidden: int = 512, init_std: float = 0.001) -> None:
        super().__init__()
        self.backbone = backbone
        feature_frames = max(1, -(-num_frames // backbone.temporal_stride))
        self.head = CtPHead(backbone.out_channels, feature_frames, num_frames, backbone.spatial_stride, hidden=hidden, init_std=init_std)

    def forward(self, clip: torch.Tensor, first_boxes: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(clip), first_boxes)
