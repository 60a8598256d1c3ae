"""Video ResNets: parameter counts of the published architectures and feature-map geometry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmtk.ctp.backbones import FINETUNE_STRIDES, PRETRAIN_STRIDES, BackboneConfig, VideoResNet, count_parameters, factorised_channels
from mmtk.ctp.head import CtPModel

# torchvision 0.2x model metadata (R3D_18_Weights / R2Plus1D_18_Weights.KINETICS400_V1, "num_params"),
# counted with the 400-class Kinetics classifier: 512 * 400 weights + 400 biases.
TORCHVISION_R3D_18 = 33_371_472
TORCHVISION_R2PLUS1D_18 = 31_505_325
KINETICS_FC = 512 * 400 + 400


@pytest.mark.parametrize(("arch", "published"), [("r3d", TORCHVISION_R3D_18), ("r2plus1d", TORCHVISION_R2PLUS1D_18)])
def test_parameter_count_matches_torchvision(arch, published):
    backbone = VideoResNet(BackboneConfig(arch=arch, depth=18))
    assert count_parameters(backbone) + KINETICS_FC == published


def test_r3d_10_parameter_count():
    # One block per stage: 14.36 M parameters without a classifier.
    assert count_parameters(VideoResNet(BackboneConfig(arch="r3d", depth=10))) == 14_361_792


def test_factorised_channels_match_full_convolution():
    # 64 -> 64: (64*64*27) // (64*9 + 3*64) = 144, the published R(2+1)D-18 value.
    assert factorised_channels(64, 64) == 144
    full = 64 * 64 * 27
    factorised = 64 * 144 * 9 + 144 * 64 * 3
    assert abs(factorised - full) / full < 0.01


def test_batchnorm_epsilon_from_config():
    backbone = VideoResNet(BackboneConfig(depth=10, widths=[4, 8, 8, 8], bn_eps=1e-3))
    norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm3d)]
    assert norms
    assert all(m.eps == 1e-3 for m in norms)


@pytest.mark.parametrize("arch", ["r3d", "r2plus1d"])
def test_feature_map_geometry(arch):
    config = BackboneConfig(arch=arch, depth=10, widths=[4, 8, 8, 16])
    clip = torch.randn(1, 3, 16, 64, 64)
    pretrain = VideoResNet(config, PRETRAIN_STRIDES)
    finetune = VideoResNet(config, FINETUNE_STRIDES)
    finetune.load_state_dict(pretrain.state_dict())  # strides carry no weights
    assert pretrain(clip).shape == (1, 16, 2, 8, 8)
    assert finetune(clip).shape == (1, 16, 2, 4, 4)
    assert (pretrain.spatial_stride, pretrain.temporal_stride) == (8, 8)


def test_ctp_model_output_shape_and_initial_scale():
    torch.manual_seed(0)
    model = CtPModel(VideoResNet(BackboneConfig(depth=10, widths=[4, 8, 8, 16])), num_frames=8, hidden=32)
    boxes = torch.tensor([[[4.0, 4.0, 20.0, 20.0], [10.0, 12.0, 30.0, 28.0]]])  # [B=1, P=2, 4]
    deltas = model(torch.randn(1, 3, 8, 32, 32), boxes)
    assert deltas.shape == (2, 8, 4)
    assert deltas.abs().max() < 0.1  # both FCs start at N(0, 0.001)
