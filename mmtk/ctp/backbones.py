"""Video ResNets: R3D and R(2+1)D with 10 or 18 layers (Tran et al., CVPR 2018).

Both are a stem (spatial stride 2, no max-pool) and four stages of basic
residual blocks, widths 64/128/256/512 by default. R3D uses full 3x3x3
convolutions; R(2+1)D factorises each into a 1x3x3 spatial and a 3x1x1
temporal convolution, with the middle channel count chosen so that the
pair has the parameters of the full 3x3x3 convolution. Each stage's
spatial and temporal strides are configurable, so the same weights serve
pretraining (feature map 1/8 in space and time) and fine-tuning (1/16 in
space).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from mmtk.core.logging import get_logger
from mmtk.core.recipe import param

log = get_logger(__name__)

BLOCKS_PER_STAGE = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2)}


@dataclass
class BackboneConfig:
    """Architecture of the video ResNet."""

    arch: Literal["r3d", "r2plus1d"] = param("r3d", help="r3d: 3x3x3 convolutions; r2plus1d: (1x3x3 then 3x1x1) factorised convolutions")
    depth: Literal[10, 18] = param(18, help="10 (one block per stage) or 18 (two blocks per stage)")
    widths: list[int] = param(default_factory=lambda: [64, 128, 256, 512], help="output channels of the four stages; the stem has widths[0]")
    bn_eps: float = param(1e-3, min=0, min_exclusive=True, help="BatchNorm epsilon")

    def __post_init__(self) -> None:
        if len(self.widths) != 4 or min(self.widths) < 1:
            raise ValueError(f"'widths' must list 4 positive channel counts, got {self.widths}")


def factorised_channels(in_channels: int, out_channels: int) -> int:
    """Return the middle channel count that gives a (2+1)D pair the parameters of a 3x3x3 convolution."""
    return (in_channels * out_channels * 27) // (in_channels * 9 + 3 * out_channels)


class SpatioTemporalConv(nn.Sequential):
    """A 3x3x3 convolution (R3D), or its (2+1)D factorisation with BatchNorm and ReLU in between."""

    def __init__(self, arch: str, in_channels: int, out_channels: int, mid_channels: int, stride: tuple[int, int], bn_eps: float) -> None:
        temporal, spatial = stride
        if arch == "r3d":
            super().__init__(nn.Conv3d(in_channels, out_channels, 3, stride=(temporal, spatial, spatial), padding=1, bias=False))
        elif arch == "r2plus1d":
            super().__init__(
                nn.Conv3d(in_channels, mid_channels, (1, 3, 3), stride=(1, spatial, spatial), padding=(0, 1, 1), bias=False),
                nn.BatchNorm3d(mid_channels, eps=bn_eps),
                nn.ReLU(inplace=True),
                nn.Conv3d(mid_channels, out_channels, (3, 1, 1), stride=(temporal, 1, 1), padding=(1, 0, 0), bias=False),
            )
        else:
            raise ValueError(f"unknown backbone architecture {arch!r}")


class BasicBlock(nn.Module):
    """Two spatio-temporal convolutions with a residual connection (1x1x1 projection when the shape changes)."""

    def __init__(self, arch: str, in_channels: int, out_channels: int, stride: tuple[int, int], bn_eps: float) -> None:
        super().__init__()
        mid_channels = factorised_channels(in_channels, out_channels)
        self.conv1 = SpatioTemporalConv(arch, in_channels, out_channels, mid_channels, stride, bn_eps)
        self.bn1 = nn.BatchNorm3d(out_channels, eps=bn_eps)
        self.conv2 = SpatioTemporalConv(arch, out_channels, out_channels, mid_channels, (1, 1), bn_eps)
        self.bn2 = nn.BatchNorm3d(out_channels, eps=bn_eps)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != (1, 1) or in_channels != out_channels:
            temporal, spatial = stride
            self.downsample = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=(temporal, spatial, spatial), bias=False),
                nn.BatchNorm3d(out_channels, eps=bn_eps),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Stem(nn.Sequential):
    """Input layer: 3x7x7 convolution with spatial stride 2 (R3D), or 1x7x7 then 3x1x1 (R(2+1)D); no max-pool.

    The R(2+1)D stem has 45 middle channels at width 64, scaled with the width.
    """

    def __init__(self, arch: str, out_channels: int, bn_eps: float) -> None:
        if arch == "r3d":
            super().__init__(
                nn.Conv3d(3, out_channels, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
                nn.BatchNorm3d(out_channels, eps=bn_eps),
                nn.ReLU(inplace=True),
            )
        else:
            mid_channels = max(1, round(45 * out_channels / 64))
            super().__init__(
                nn.Conv3d(3, mid_channels, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
                nn.BatchNorm3d(mid_channels, eps=bn_eps),
                nn.ReLU(inplace=True),
                nn.Conv3d(mid_channels, out_channels, (3, 1, 1), stride=1, padding=(1, 0, 0), bias=False),
                nn.BatchNorm3d(out_channels, eps=bn_eps),
                nn.ReLU(inplace=True),
            )


PRETRAIN_STRIDES = ((1, 1), (2, 2), (2, 2), (2, 1))  # (temporal, spatial) per stage: output 1/8 time, 1/8 space
FINETUNE_STRIDES = ((1, 1), (2, 2), (2, 2), (2, 2))  # output 1/8 time, 1/16 space


class VideoResNet(nn.Module):
    """Feature extractor: clip [B, 3, T, H, W] -> feature map [B, C, T/ts, H/ss, W/ss].

    ``strides`` gives (temporal, spatial) for each of the four stages; the
    stem adds spatial stride 2. Strides carry no weights, so a checkpoint
    loads into either stride setting.
    """

    def __init__(self, config: BackboneConfig, strides: tuple[tuple[int, int], ...] = PRETRAIN_STRIDES) -> None:
        super().__init__()
        self.config = config
        self.strides = strides
        self.stem = Stem(config.arch, config.widths[0], config.bn_eps)
        in_channels = config.widths[0]
        stages = []
        for width, blocks, stride in zip(config.widths, BLOCKS_PER_STAGE[config.depth], strides):
            layers = []
            for index in range(blocks):
                layers.append(BasicBlock(config.arch, in_channels, width, stride if index == 0 else (1, 1), config.bn_eps))
                in_channels = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = in_channels
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm3d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def spatial_stride(self) -> int:
        """Input pixels per feature-map pixel."""
        stride = 2
        for _, spatial in self.strides:
            stride *= spatial
        return stride

    @property
    def temporal_stride(self) -> int:
        """Input frames per feature-map time step."""
        stride = 1
        for temporal, _ in self.strides:
            stride *= temporal
        return stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # [B, C0, T, H/2, W/2]
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)  # [B, C3, T/ts, H/ss, W/ss]


def count_parameters(module: nn.Module) -> int:
    """Return the number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def maybe_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Convert BatchNorm to SyncBatchNorm under torch.distributed with several processes on the NCCL backend.

    Other backends (gloo on CPU) keep per-process BatchNorm statistics and
    log it, because torch's SyncBatchNorm raises ValueError on CPU input in
    training mode (torch 2.13). Each process then normalizes over its own
    micro-batch, as one process with gradient accumulation does.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return module
    backend = dist.get_backend()
    # NOTE: the NCCL branch has run only against a stand-in process group in the tests, not on GPUs.
    if backend == "nccl":
        log.info("converting BatchNorm to SyncBatchNorm over %d processes", dist.get_world_size())
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    log.info("keeping per-process BatchNorm statistics on the %s backend: SyncBatchNorm needs GPU tensors", backend)
    return module
