"""Reusable image encoders: a CLIP vision transformer and EfficientNet-lite0, plus a Fréchet distance."""

from mmtk.nn.vision.clip import (
    ClipVisionConfig,
    ClipVisionOutput,
    ClipVisionTransformer,
    load_clip_vision,
    map_hf_clip_vision_name,
    read_clip_vision_config,
)
from mmtk.nn.vision.efficientnet import (
    EfficientNetLite0,
    EfficientNetOutput,
    default_weights_path,
    efficientnet_lite0_preprocessor,
)
from mmtk.nn.vision.frechet import frechet_distance, frechet_distance_from_statistics, gaussian_statistics

__all__ = [
    "ClipVisionConfig",
    "ClipVisionOutput",
    "ClipVisionTransformer",
    "EfficientNetLite0",
    "EfficientNetOutput",
    "default_weights_path",
    "efficientnet_lite0_preprocessor",
    "frechet_distance",
    "frechet_distance_from_statistics",
    "gaussian_statistics",
    "load_clip_vision",
    "map_hf_clip_vision_name",
    "read_clip_vision_config",
]
