"""The Catch-the-Patch proxy task: random patch trajectories pasted into a clip.

For each clip, :func:`sample_track` draws a patch (size, aspect ratio,
position) and a smooth trajectory of its box over the T frames, with the
centre and the size following their own key frames. :func:`paste_tracks`
cuts the patch from the clip itself (at a random source frame), resizes it
to each frame's box and composites it with a soft alpha mask. In a random
subset of frames the patch is left out. The targets are the per-frame boxes
(x1, y1, x2, y2) in pixels of the cropped clip, shape [P, T, 4].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mmtk.core.recipe import param
from mmtk.ctp import transforms as T

INTERPOLATIONS = ("uniform", "accelerating", "decelerating")
MASK_SHAPES = ("rectangle", "ellipse", "rhombus")


@dataclass
class ProxyTaskConfig:
    """Patch, trajectory, mask and colour settings of the proxy task (pixel sizes refer to the cropped clip)."""

    num_patches: int = param(3, min=1, help="patches pasted into each clip")
    scales: list[float] = param(default_factory=lambda: [16, 24, 28, 32, 48, 64], help="patch scales s in pixels; width = s*sqrt(r), height = s/sqrt(r)")
    aspect_ratios: list[float] = param(default_factory=lambda: [0.5, 0.67, 0.75, 1.0, 1.33, 1.5, 2.0], help="patch aspect ratios r (width / height)")
    size_jitter: float = param(0.18, min=0, help="each side is multiplied by exp(U(-j, j))")
    min_size: int = param(4, min=1, help="smallest patch side in pixels")
    loc_velocity: float = param(3.0, min=0, help="maximum centre speed in pixels per frame, per axis")
    size_velocity: float = param(0.025, min=0, help="maximum log-size change per frame, per side")
    inner_key_probs: list[float] = param(default_factory=lambda: [0.5, 0.3, 0.2], help="probabilities of 0, 1, 2 inner key frames")
    interpolation_probs: list[float] = param(default_factory=lambda: [0.7, 0.15, 0.15], help="probabilities of uniform, accelerating, decelerating motion between key frames")
    visible_prob: float = param(0.8, min=0, max=1, help="probability that a patch is pasted in a frame (frame 0 and the source frame always are)")
    mask_shape_probs: list[float] = param(default_factory=lambda: [0.5, 0.35, 0.15], help="probabilities of a rectangle, ellipse, rhombus alpha mask")
    soft_edge_prob: float = param(0.5, min=0, max=1, help="probability of a soft mask edge")
    soft_edge_start: list[float] = param(default_factory=lambda: [0.30, 0.45], help="range of the distance from the patch centre, as a fraction of the patch side (the edge is at 0.5), where the soft edge ramp starts")
    opacity: list[float] = param(default_factory=lambda: [0.8, 1.0], help="range of the patch opacity at key frames")
    hue_saturation_prob: float = param(0.25, min=0, max=1, help="probability of hue and saturation jitter after pasting")
    hue_delta: float = param(12.0, min=0, help="hue shift range in OpenCV hue units (half degrees)")
    saturation_delta: float = param(0.1, min=0, help="saturation factor range 1 +- delta")
    brightness_prob: float = param(0.5, min=0, max=1, help="probability of time-varying brightness jitter")
    brightness_delta: float = param(30.0, min=0, help="brightness offset range in 0..255 units")
    contrast_prob: float = param(0.5, min=0, max=1, help="probability of time-varying contrast jitter")
    contrast_delta: float = param(0.12, min=0, help="contrast factor range 1 +- delta")

    def __post_init__(self) -> None:
        for name, count in (("inner_key_probs", 3), ("interpolation_probs", 3), ("mask_shape_probs", 3)):
            probs = getattr(self, name)
            if len(probs) != count or min(probs) < 0 or abs(sum(probs) - 1) > 1e-6:
                raise ValueError(f"'{name}' must hold {count} non-negative probabilities summing to 1, got {probs}")
        for name, upper in (("soft_edge_start", 0.5), ("opacity", 1.0)):
            bounds = getattr(self, name)
            if len(bounds) != 2 or not 0 <= bounds[0] <= bounds[1] <= upper:
                raise ValueError(f"'{name}' must be [low, high] with 0 <= low <= high <= {upper}, got {bounds}")
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"'scales' must be positive pixel sizes, got {self.scales}")
        if not self.aspect_ratios or min(self.aspect_ratios) <= 0:
            raise ValueError(f"'aspect_ratios' must be positive, got {self.aspect_ratios}")


@dataclass
class PatchTrack:
    """One patch's trajectory over T frames.

    ``centers`` and ``sizes`` [T, 2] are the float (x, y) and (width, height)
    before rounding. ``boxes`` [T, 4] are the rounded, clipped integer boxes
    (x1, y1, x2, y2) that are pasted and used as targets.
    """

    centers: np.ndarray
    sizes: np.ndarray
    boxes: np.ndarray
    key_frames: np.ndarray
    size_key_frames: np.ndarray
    opacity: np.ndarray
    visible: np.ndarray
    source_frame: int
    mask_shape: str = "rectangle"
    soft_edge_start: float | None = None


# ------------------------------------------------------------- trajectories


def sample_key_frames(num_frames: int, rng: np.random.Generator, inner_probs: list[float]) -> np.ndarray:
    """Draw key frames: always 0 and T-1, plus 0-2 inner ones evenly spaced with +-1/3-spacing jitter."""
    last = num_frames - 1
    num_inner = int(rng.choice(3, p=inner_probs))
    keys = [0, last]
    if num_inner and last > 1:
        spacing = last / (num_inner + 1)
        for k in range(1, num_inner + 1):
            position = k * spacing + rng.uniform(-1 / 3, 1 / 3) * spacing
            keys.append(int(np.clip(round(position), 1, last - 1)))
    return np.unique(np.asarray(keys, dtype=np.int64))


def motion_profile(kind: str, u: np.ndarray) -> np.ndarray:
    """Map the fraction u in [0, 1] of a segment to the fraction of its displacement covered."""
    if kind == "uniform":
        return u
    if kind == "accelerating":
        return u * u
    if kind == "decelerating":
        return 1.0 - (1.0 - u) ** 2
    raise ValueError(f"unknown motion profile {kind!r}")


def max_profile_step(kind: str, frames: int) -> float:
    """Return the largest one-frame change of :func:`motion_profile` over a segment of ``frames`` frames."""
    u = np.arange(frames + 1) / frames
    return float(np.diff(motion_profile(kind, u)).max())


def interpolate_segments(key_frames: np.ndarray, key_values: np.ndarray, kinds: list[str], num_frames: int) -> np.ndarray:
    """Interpolate key values [K, D] to every frame [T, D], segment i following motion profile ``kinds[i]``."""
    values = np.empty((num_frames, key_values.shape[1]))
    for i in range(len(key_frames) - 1):
        start, end = int(key_frames[i]), int(key_frames[i + 1])
        u = (np.arange(start, end + 1) - start) / (end - start)
        weight = motion_profile(kinds[i], u)[:, None]
        values[start : end + 1] = key_values[i] + (key_values[i + 1] - key_values[i]) * weight
    return values


def sample_track(height: int, width: int, num_frames: int, rng: np.random.Generator, config: ProxyTaskConfig) -> PatchTrack:
    """Draw one patch trajectory inside an image of ``height`` x ``width`` pixels.

    The centre moves by at most ``loc_velocity`` pixels per frame and axis
    before rounding. Displacements of accelerating or decelerating segments
    are scaled down so that their fastest frame obeys this limit. Each side
    changes by at most ``size_velocity`` in log scale per frame.
    """
    image = np.array([width, height], dtype=np.float64)

    # Initial box: scale and aspect ratio, jittered sides, top-left uniform over the image.
    scale = float(rng.choice(config.scales))
    ratio = float(rng.choice(config.aspect_ratios))
    size0 = np.array([scale * np.sqrt(ratio), scale / np.sqrt(ratio)])
    size0 *= np.exp(rng.uniform(-config.size_jitter, config.size_jitter, size=2))
    size0 = np.clip(size0, config.min_size, image)
    top_left = rng.uniform(0, 1, size=2) * (image - size0)
    center0 = top_left + size0 / 2

    # Size trajectory: log-size random walk over its own key frames.
    size_keys = sample_key_frames(num_frames, rng, config.inner_key_probs)
    size_kinds = [INTERPOLATIONS[int(rng.choice(3, p=config.interpolation_probs))] for _ in range(len(size_keys) - 1)]
    key_sizes = [size0]
    for i in range(1, len(size_keys)):
        gap = size_keys[i] - size_keys[i - 1]
        limit = config.size_velocity / max_profile_step(size_kinds[i - 1], gap)
        change = np.exp(rng.uniform(-limit, limit, size=2))
        key_sizes.append(np.clip(key_sizes[-1] * change, config.min_size, image))
    sizes = np.exp(interpolate_segments(size_keys, np.log(np.stack(key_sizes)), size_kinds, num_frames))  # [T, 2]

    # Centre trajectory: bounded displacement per key segment, clamped so the box stays inside.
    center_keys = sample_key_frames(num_frames, rng, config.inner_key_probs)
    center_kinds = [INTERPOLATIONS[int(rng.choice(3, p=config.interpolation_probs))] for _ in range(len(center_keys) - 1)]
    key_centers = [center0]
    for i in range(1, len(center_keys)):
        gap = center_keys[i] - center_keys[i - 1]
        displacement = rng.uniform(-config.loc_velocity * gap, config.loc_velocity * gap, size=2)
        displacement /= gap * max_profile_step(center_kinds[i - 1], gap)
        half = sizes[center_keys[i]] / 2
        previous = key_centers[-1]
        # The clamp never pushes past the previous centre, so it cannot raise the speed.
        low, high = np.minimum(half, previous), np.maximum(image - half, previous)
        key_centers.append(np.clip(previous + displacement, low, high))
    centers = interpolate_segments(center_keys, np.stack(key_centers), center_kinds, num_frames)  # [T, 2]

    # Integer boxes, clipped to the image, at least one pixel wide.
    boxes = np.concatenate([centers - sizes / 2, centers + sizes / 2], axis=1).round()  # [T, 4]
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    boxes[:, 2] = np.maximum(boxes[:, 2], np.minimum(boxes[:, 0] + 1, width))
    boxes[:, 0] = np.minimum(boxes[:, 0], boxes[:, 2] - 1)
    boxes[:, 3] = np.maximum(boxes[:, 3], np.minimum(boxes[:, 1] + 1, height))
    boxes[:, 1] = np.minimum(boxes[:, 1], boxes[:, 3] - 1)

    # Appearance: opacity at the centre key frames, mask shape and soft edge.
    key_opacity = rng.uniform(config.opacity[0], config.opacity[1], size=len(center_keys))
    opacity = np.interp(np.arange(num_frames), center_keys, key_opacity)
    mask_shape = MASK_SHAPES[int(rng.choice(3, p=config.mask_shape_probs))]
    soft_edge_start = float(rng.uniform(*config.soft_edge_start)) if rng.uniform() < config.soft_edge_prob else None

    # Visibility: the source frame and frame 0 are always pasted.
    source_frame = int(rng.integers(num_frames))
    visible = rng.uniform(size=num_frames) <= config.visible_prob
    visible[0] = True
    visible[source_frame] = True

    return PatchTrack(
        centers=centers,
        sizes=sizes,
        boxes=boxes.astype(np.int64),
        key_frames=center_keys,
        size_key_frames=size_keys,
        opacity=opacity,
        visible=visible,
        source_frame=source_frame,
        mask_shape=mask_shape,
        soft_edge_start=soft_edge_start,
    )


# ------------------------------------------------------------------ pasting


def alpha_mask(height: int, width: int, shape: str, soft_edge_start: float | None) -> torch.Tensor:
    """Return a [height, width] alpha mask in 0..1 for a patch of that size.

    Pixel centres get normalised coordinates u, v in (-1, 1). The radius is
    max(|u|, |v|) for a rectangle, sqrt(u^2 + v^2) for an ellipse and
    |u| + |v| for a rhombus. A hard mask is 1 where the radius is at most 1.
    ``soft_edge_start`` is a distance from the centre as a fraction of the
    patch side, so the edge is at 0.5 and the ramp starts at radius
    2 * ``soft_edge_start``: a soft mask falls linearly from 1 there to 0 at
    radius 1.
    """
    # numpy is several times faster than torch on arrays this small.
    v = ((np.arange(height, dtype=np.float32) + 0.5) / height * 2 - 1)[:, None]
    u = ((np.arange(width, dtype=np.float32) + 0.5) / width * 2 - 1)[None, :]
    if shape == "rectangle":
        radius = np.maximum(np.abs(u), np.abs(v))
    elif shape == "ellipse":
        radius = np.sqrt(u * u + v * v)
    elif shape == "rhombus":
        radius = np.abs(u) + np.abs(v)
    else:
        raise ValueError(f"unknown mask shape {shape!r}")
    if soft_edge_start is None:
        mask = (radius <= 1).astype(np.float32)
    else:
        ramp = max(1 - 2 * soft_edge_start, 1e-6)  # a start at 0.5 gives a hard edge
        mask = np.clip((1 - radius) / ramp, 0, 1).astype(np.float32)
    return torch.from_numpy(mask)


def render_patch(source: torch.Tensor, track: PatchTrack, frame: int, resized: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the patch pixels [3, h, w] and alpha [h, w] for ``frame`` (h, w from that frame's box).

    The pixels come from the box at the source frame, resized bilinearly.
    ``resized`` caches pixels and masks by box size across the frames of one track.
    """
    sx1, sy1, sx2, sy2 = (int(v) for v in track.boxes[track.source_frame])
    x1, y1, x2, y2 = (int(v) for v in track.boxes[frame])
    height, width = y2 - y1, x2 - x1
    cached = resized.get((height, width)) if resized is not None else None
    if cached is None:
        content = source[track.source_frame, :, sy1:sy2, sx1:sx2]  # [3, hs, ws]
        if content.shape[-2:] != (height, width):
            content = F.interpolate(content[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        cached = (content, alpha_mask(height, width, track.mask_shape, track.soft_edge_start))
        if resized is not None:
            resized[(height, width)] = cached
    content, mask = cached
    return content, mask * float(track.opacity[frame])


def paste_tracks(clip: torch.Tensor, tracks: list[PatchTrack]) -> torch.Tensor:
    """Composite every visible patch into a copy of ``clip`` [T, 3, H, W] as frame*(1-alpha) + patch*alpha.

    Patches are cut from the unmodified ``clip`` and pasted largest (by mean
    box area) first, so small patches are not hidden under large ones.
    """
    output = clip.clone()
    areas = [float(np.mean((t.boxes[:, 2] - t.boxes[:, 0]) * (t.boxes[:, 3] - t.boxes[:, 1]))) for t in tracks]
    for index in np.argsort(areas, kind="stable")[::-1]:
        track = tracks[int(index)]
        resized: dict = {}
        for frame in range(clip.shape[0]):
            if not track.visible[frame]:
                continue
            content, alpha = render_patch(clip, track, frame, resized)
            x1, y1, x2, y2 = (int(v) for v in track.boxes[frame])
            region = output[frame, :, y1:y2, x1:x2]
            output[frame, :, y1:y2, x1:x2] = region * (1 - alpha) + content * alpha
    return output


# ---------------------------------------------------------------- the sample


def jitter_colour(clip: torch.Tensor, rng: np.random.Generator, config: ProxyTaskConfig) -> torch.Tensor:
    """Apply the post-paste colour jitter: hue/saturation, then brightness and contrast varying over time."""
    num_frames = clip.shape[0]
    if rng.uniform() < config.hue_saturation_prob:
        hue = rng.uniform(-config.hue_delta, config.hue_delta) * 2  # OpenCV hue units are half degrees
        saturation = 1 + rng.uniform(-config.saturation_delta, config.saturation_delta)
        clip = T.adjust_hue_saturation(clip, hue_degrees=hue, saturation=saturation)
    brightness = contrast = None
    if rng.uniform() < config.brightness_prob:
        keys = sample_key_frames(num_frames, rng, config.inner_key_probs)
        values = rng.uniform(-config.brightness_delta, config.brightness_delta, size=len(keys))
        brightness = torch.as_tensor(T.interpolate_keys(keys, values, num_frames), dtype=clip.dtype)
    if rng.uniform() < config.contrast_prob:
        keys = sample_key_frames(num_frames, rng, config.inner_key_probs)
        values = 1 + rng.uniform(-config.contrast_delta, config.contrast_delta, size=len(keys))
        contrast = torch.as_tensor(T.interpolate_keys(keys, values, num_frames), dtype=clip.dtype)
    if brightness is not None or contrast is not None:
        clip = T.adjust_brightness_contrast(clip, brightness, contrast)
    return clip


def make_proxy_sample(
    frames: np.ndarray,
    rng: np.random.Generator,
    config: ProxyTaskConfig,
    crop_size: int,
    short_sides: list[int],
    flip_prob: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Turn decoded frames ``uint8`` [T, H, W, 3] into one training sample of the proxy task.

    Steps: resize the short side to one of ``short_sides``, random-crop
    ``crop_size``, flip, paste ``config.num_patches`` tracks, jitter colours
    and normalise. Returns ``clip`` [3, T, S, S] (normalised), ``boxes``
    [P, T, 4] float pixels and ``visible`` [P, T] bool.
    """
    clip = T.to_float_clip(frames)  # [T, 3, H, W]
    clip = T.random_short_side_crop(clip, short_sides, crop_size, rng)  # [T, 3, S, S]
    if rng.uniform() < flip_prob:
        clip = T.hflip(clip)

    num_frames = clip.shape[0]
    tracks = [sample_track(crop_size, crop_size, num_frames, rng, config) for _ in range(config.num_patches)]
    clip = paste_tracks(clip, tracks)
    clip = jitter_colour(clip, rng, config)

    return {
        "clip": T.normalize(clip),  # [3, T, S, S]
        "boxes": torch.as_tensor(np.stack([t.boxes for t in tracks]), dtype=torch.float32),  # [P, T, 4]
        "visible": torch.as_tensor(np.stack([t.visible for t in tracks])),  # [P, T]
    }
