"""Spatial and colour transforms for video clips, written in torch.

A clip here is a float tensor [T, 3, H, W] with values in 0..255 until
:func:`normalize`, which returns the backbone's layout [3, T, H, W]. Random
choices take a numpy Generator so that a clip is a pure function of its seed.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0..255 scale
IMAGENET_STD = (58.395, 57.12, 57.375)


def to_float_clip(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Convert ``uint8`` frames [T, H, W, 3] to a float clip [T, 3, H, W] in 0..255."""
    tensor = torch.as_tensor(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    return tensor.permute(0, 3, 1, 2).float()


ANTIALIAS_BELOW = 2 / 3  # scale factors under this get an antialiasing filter


def resize(clip: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize every frame bilinearly (half-pixel centres) to height x width.

    Shrinking by more than 1.5 times applies an antialiasing filter. Milder
    shrinking skips it, which is several times faster and aliases little.
    """
    if clip.shape[-2:] == (height, width):
        return clip
    scale = min(height / clip.shape[-2], width / clip.shape[-1])
    return F.interpolate(clip, size=(height, width), mode="bilinear", align_corners=False, antialias=scale < ANTIALIAS_BELOW)


def resize_short_side(clip: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so that the shorter side has ``size`` pixels, keeping the aspect ratio."""
    height, width = clip.shape[-2:]
    if height <= width:
        return resize(clip, size, max(size, round(width * size / height)))
    return resize(clip, max(size, round(height * size / width)), size)


def crop(clip: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """Cut the same window out of every frame."""
    return clip[..., top : top + height, left : left + width]


def random_crop(clip: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    """Cut a ``size`` x ``size`` window at a uniformly random position (same for every frame)."""
    height, width = clip.shape[-2:]
    if height < size or width < size:
        raise ValueError(f"cannot crop {size}x{size} from frames of {height}x{width}")
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    return crop(clip, top, left, size, size)


def center_crop(clip: torch.Tensor, size: int) -> torch.Tensor:
    """Cut the central ``size`` x ``size`` window."""
    height, width = clip.shape[-2:]
    return crop(clip, (height - size) // 2, (width - size) // 2, size, size)


def random_resized_crop(
    clip: torch.Tensor,
    size: int,
    rng: np.random.Generator,
    area_range: tuple[float, float] = (0.25, 1.0),
    ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Crop a window of random area fraction and aspect ratio (log-uniform), then resize it to ``size``.

    Falls back to a centre crop of the short side after 10 rejected draws.
    """
    height, width = clip.shape[-2:]
    area = height * width
    for _ in range(10):
        target_area = area * rng.uniform(*area_range)
        ratio = math.exp(rng.uniform(math.log(ratio_range[0]), math.log(ratio_range[1])))
        crop_width = round(math.sqrt(target_area * ratio))
        crop_height = round(math.sqrt(target_area / ratio))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return resize(crop(clip, top, left, crop_height, crop_width), size, size)
    side = min(height, width)
    return resize(center_crop(clip, side), size, size)


def multi_scale_crop(clip: torch.Tensor, sizes: Sequence[tuple[int, int]], crop_size: int, rng: np.random.Generator) -> torch.Tensor:
    """Resize to one (height, width) drawn from ``sizes`` (a height of 0 keeps the aspect ratio), then random-crop."""
    height, width = sizes[int(rng.integers(len(sizes)))]
    if height <= 0:
        clip = resize_short_side(clip, width)
    elif width <= 0:
        clip = resize_short_side(clip, height)
    else:
        clip = resize(clip, height, width)
    return random_crop(clip, crop_size, rng)


def random_short_side_crop(clip: torch.Tensor, short_sides: Sequence[int], crop_size: int, rng: np.random.Generator) -> torch.Tensor:
    """Crop as if the short side were resized to one of ``short_sides`` and a ``crop_size`` square were cut.

    The square window of round(crop_size * short / s) source pixels (s drawn
    from ``short_sides``) is placed uniformly at random and resized to
    ``crop_size``. Resizing only the window costs a fraction of resizing
    whole frames; the scale differs from s by the rounding of the window.
    """
    height, width = clip.shape[-2:]
    short = min(height, width)
    target = int(short_sides[int(rng.integers(len(short_sides)))])
    window = min(short, max(1, round(crop_size * short / target)))
    top = int(rng.integers(0, height - window + 1))
    left = int(rng.integers(0, width - window + 1))
    return resize(crop(clip, top, left, window, window), crop_size, crop_size)


def hflip(clip: torch.Tensor) -> torch.Tensor:
    """Mirror every frame left to right."""
    return clip.flip(-1)


def grayscale(clip: torch.Tensor) -> torch.Tensor:
    """Return the ITU-R BT.601 luma of each frame, shape [T, 1, H, W]."""
    weights = clip.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (clip * weights).sum(dim=1, keepdim=True)


def adjust_brightness_contrast(clip: torch.Tensor, brightness: torch.Tensor | None = None, contrast: torch.Tensor | None = None) -> torch.Tensor:
    """Add ``brightness`` [T] (0..255 units) and scale by ``contrast`` [T] around each frame's mean luma."""
    if brightness is not None:
        clip = clip + brightness.view(-1, 1, 1, 1)
    if contrast is not None:
        mean = grayscale(clip).mean(dim=(1, 2, 3), keepdim=True)  # [T, 1, 1, 1]
        clip = (clip - mean) * contrast.view(-1, 1, 1, 1) + mean
    return clip.clamp(0, 255)


def adjust_hue_saturation(clip: torch.Tensor, hue_degrees: float = 0.0, saturation: float = 1.0) -> torch.Tensor:
    """Rotate hue by ``hue_degrees`` and scale saturation by ``saturation``.

    The hue rotation turns the chroma plane of the YIQ colour space, which
    keeps luma fixed; it approximates an HSV hue shift.
    """
    if hue_degrees:
        angle = math.radians(hue_degrees)
        to_yiq = clip.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
        rotate = clip.new_tensor([[1, 0, 0], [0, math.cos(angle), -math.sin(angle)], [0, math.sin(angle), math.cos(angle)]])
        matrix = torch.linalg.inv(to_yiq) @ rotate @ to_yiq  # [3, 3]
        clip = torch.einsum("ij,tjhw->tihw", matrix, clip)
    if saturation != 1.0:
        gray = grayscale(clip)
        clip = gray + (clip - gray) * saturation
    return clip.clamp(0, 255)


def normalize(clip: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Subtract the mean and divide by the standard deviation per channel; [T, 3, H, W] -> [3, T, H, W]."""
    mean_tensor = clip.new_tensor(mean).view(1, 3, 1, 1)
    std_tensor = clip.new_tensor(std).view(1, 3, 1, 1)
    return ((clip - mean_tensor) / std_tensor).permute(1, 0, 2, 3).contiguous()


def denormalize(clip: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Invert :func:`normalize`: [3, T, H, W] -> ``uint8`` [T, H, W, 3]."""
    mean_tensor = clip.new_tensor(mean).view(3, 1, 1, 1)
    std_tensor = clip.new_tensor(std).view(3, 1, 1, 1)
    pixels = (clip * std_tensor + mean_tensor).clamp(0, 255).round()
    return pixels.permute(1, 2, 3, 0).to(torch.uint8)


def interpolate_keys(key_frames: np.ndarray, key_values: np.ndarray, num_frames: int) -> np.ndarray:
    """Linearly interpolate values given at key frames to every frame 0..num_frames-1."""
    return np.interp(np.arange(num_frames), key_frames, key_values)
