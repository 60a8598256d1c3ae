"""Image loading with PIL and batched preprocessing in torch.

Images travel as ``uint8`` tensors of shape (3, H, W) until they are
converted to float. The float steps work on batches (B, 3, H, W) with values
in [0, 1] until :func:`normalize` maps them to the encoder's input range.
torchvision is not used because it does not import beside the local torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmtk.core.errors import DataError, InputError
from mmtk.core.logging import get_logger

log = get_logger(__name__)

# Per-channel RGB mean and standard deviation on the [0, 1] scale.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# EfficientNet-lite inputs are (pixel - 127) / 128 with pixels in [0, 255], the
# MEAN_RGB and STDDEV_RGB of TensorFlow's efficientnet_lite_builder.py.
EFFICIENTNET_LITE_MEAN = (127.0 / 255.0,) * 3
EFFICIENTNET_LITE_STD = (128.0 / 255.0,) * 3

INTERPOLATION_MODES = ("nearest", "bilinear", "bicubic")

# scikit-image sample images that are colour photographs of real scenes and
# ship inside the scikit-image wheel. ``cat`` is left out because it returns
# the same array as ``chelsea``.
SKIMAGE_COLOR_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
# Grayscale photographs of real scenes, returned as three equal channels.
SKIMAGE_GRAY_PHOTOS = ("camera", "moon", "coins", "clock", "brick", "grass", "gravel", "page", "text")


def load_image(path: str | Path) -> torch.Tensor:
    """Read an image file as an RGB ``uint8`` tensor of shape (3, H, W).

    Grayscale and palette images are converted to RGB, and an alpha channel
    is dropped. Raises DataError when the file is missing, unreadable or not
    an image format that PIL decodes.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}. Check the path.")
    try:
        with Image.open(path) as image:
            image.load()
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot decode image file {path} (corrupt, truncated or not an image): {exc}") from exc

    array = np.asarray(rgb, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()  # (3, H, W)


def load_images(paths: Sequence[str | Path]) -> list[torch.Tensor]:
    """Read several image files; returns a list of (3, H, W) ``uint8`` tensors."""
    return [load_image(path) for path in paths]


def as_image_tensor(image: np.ndarray | torch.Tensor, name: str = "image") -> torch.Tensor:
    """Convert one image to a channels-first tensor of shape (3, H, W).

    Accepts a (H, W, 3) numpy array (the PIL and scikit-image layout), a
    (3, H, W) tensor, or a 2-D grayscale array that is repeated to three
    channels. The dtype is kept. Raises InputError naming ``name`` for any
    other shape or channel count.
    """
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)  # (H, W) -> (H, W, 3)
        if image.ndim != 3 or image.shape[2] != 3:
            raise InputError(f"{name} has shape {image.shape}; expected a (H, W, 3) RGB or (H, W) grayscale array.")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # (3, H, W)

    if not isinstance(image, torch.Tensor):
        raise InputError(f"{name} is a {type(image).__name__}; expected a numpy array or a torch tensor.")
    if image.ndim == 2:
        image = image.unsqueeze(0).expand(3, -1, -1)  # (H, W) -> (3, H, W)
    if image.ndim != 3 or image.shape[0] != 3:
        raise InputError(f"{name} has shape {tuple(image.shape)}; expected a (3, H, W) RGB tensor.")
    return image


def to_float(images: torch.Tensor) -> torch.Tensor:
    """Convert ``uint8`` pixels in [0, 255] to float32 in [0, 1]; float input is only cast to float32.

    Float values outside [-0.05, 1.05] raise InputError, because they usually
    mean images in [-1, 1] or [0, 255] that were passed as if in [0, 1].
    """
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 255.0
    if not images.is_floating_point():
        raise InputError(f"images have dtype {images.dtype}; expected uint8 in [0, 255] or float in [0, 1].")
    low, high = images.min().item(), images.max().item()
    if low < -0.05 or high > 1.05:
        raise InputError(
            f"float images range over [{low:.3g}, {high:.3g}]; expected [0, 1]. "
            "Map [-1, 1] images with (x + 1) / 2 and clamp to [0, 1], or pass uint8 pixels."
        )
    return images.to(torch.float32)


def check_batch(images: torch.Tensor, name: str = "images") -> None:
    """Raise InputError unless ``images`` is a (B, 3, H, W) tensor with finite values."""
    if not isinstance(images, torch.Tensor):
        raise InputError(f"{name} is a {type(images).__name__}; expected a (B, 3, H, W) torch tensor.")
    if images.ndim != 4:
        raise InputError(f"{name} has shape {tuple(images.shape)}; expected 4 dimensions (B, 3, H, W).")
    if images.shape[1] != 3:
        raise InputError(f"{name} has {images.shape[1]} channels (shape {tuple(images.shape)}); expected 3 RGB channels.")
    if images.is_floating_point() and not torch.isfinite(images).all():
        raise InputError(f"NaN or infinite values found in {name}.")


def resize(images: torch.Tensor, size: tuple[int, int], interpolation: str = "bilinear", antialias: bool = True) -> torch.Tensor:
    """Resize a float batch (B, C, H, W) to ``size`` = (height, width) pixels.

    Pixel centres are aligned as in PIL (``align_corners=False``). With
    ``antialias`` the filter widens when shrinking, as PIL's resize does, so
    that downscaling does not alias. Bicubic output may leave [0, 1] and is
    clamped back to it.
    """
    if interpolation not in INTERPOLATION_MODES:
        raise InputError(f"interpolation {interpolation!r} is not supported; use one of {', '.join(INTERPOLATION_MODES)}.")
    height, width = size
    if height < 1 or width < 1:
        raise InputError(f"resize size {size} must be positive.")
    if tuple(images.shape[-2:]) == (height, width):
        return images

    if interpolation == "nearest":
        return F.interpolate(images, size=(height, width), mode="nearest-exact")
    resized = F.interpolate(images, size=(height, width), mode=interpolation, align_corners=False, antialias=antialias)
    if interpolation == "bicubic":
        resized = resized.clamp(0.0, 1.0)
    return resized


def resize_shorter_side(images: torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Resize a batch so that its shorter side is ``size`` pixels, keeping the aspect ratio."""
    height, width = images.shape[-2:]
    scale = size / min(height, width)
    new_size = (max(size, round(height * scale)), max(size, round(width * scale)))
    return resize(images, new_size, interpolation)


def center_crop(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Cut the central ``size`` = (height, width) window out of a batch (..., H, W).

    When the excess is odd, the extra row or column is removed from the bottom
    or right. Raises InputError when the image is smaller than the window.
    """
    height, width = images.shape[-2:]
    crop_height, crop_width = size
    if crop_height > height or crop_width > width:
        raise InputError(f"center crop of {crop_height}x{crop_width} does not fit an image of {height}x{width}; resize first.")
    top = (height - crop_height) // 2
    left = (width - crop_width) // 2
    return images[..., top : top + crop_height, left : left + crop_width]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Subtract the per-channel ``mean`` and divide by ``std`` on a batch (B, 3, H, W)."""
    mean_tensor = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_tensor = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_tensor) / std_tensor


@dataclass(frozen=True)
class ImagePreprocessor:
    """Resize, crop and normalise settings that turn images into an encoder batch.

    Attributes:
        size: output height and width in pixels.
        resize_mode: ``"square"`` stretches the whole image to ``size`` x ``size``;
            ``"shorter_side"`` scales the shorter side to ``resize_size`` (default
            ``size``) and then center-crops ``size`` x ``size``.
        resize_size: shorter side in pixels before the crop in ``"shorter_side"`` mode.
        interpolation: ``"bilinear"``, ``"bicubic"`` or ``"nearest"``.
        mean, std: per-channel statistics on the [0, 1] scale.
    """

    size: int = 224
    resize_mode: str = "square"
    resize_size: int | None = None
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.resize_mode not in ("square", "shorter_side"):
            raise InputError(f"resize_mode {self.resize_mode!r} is not supported; use 'square' or 'shorter_side'.")
        if self.interpolation not in INTERPOLATION_MODES:
            raise InputError(f"interpolation {self.interpolation!r} is not supported; use one of {', '.join(INTERPOLATION_MODES)}.")
        if self.size < 1:
            raise InputError(f"size {self.size} must be a positive number of pixels.")
        if self.resize_size is not None and self.resize_size < self.size:
            raise InputError(f"resize_size {self.resize_size} is smaller than the crop size {self.size}.")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise InputError(f"mean {self.mean} and std {self.std} need 3 values each, with std > 0.")

    def __call__(self, images: Sequence[np.ndarray | torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Preprocess images into one float32 batch (B, 3, size, size).

        ``images`` is a (B, 3, H, W) tensor or a sequence of images of any
        sizes, each a (H, W, 3) array or a (3, H, W) tensor, ``uint8`` in
        [0, 255] or float in [0, 1]. A single image array or tensor gives a
        batch of one.
        """
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            check_batch(images)
            return self._transform(to_float(images))
        if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim in (2, 3):
            images = [images]  # one image, not a sequence of rows or channels

        if len(images) == 0:
            raise InputError("no images to preprocess; pass at least one image.")
        outputs = []
        for index, image in enumerate(images):
            tensor = as_image_tensor(image, name=f"image {index}").unsqueeze(0)  # (1, 3, H, W)
            check_batch(tensor, name=f"image {index}")
            outputs.append(self._transform(to_float(tensor)))
        return torch.cat(outputs, dim=0)  # (B, 3, size, size)

    def _transform(self, batch: torch.Tensor) -> torch.Tensor:
        if self.resize_mode == "square":
            batch = resize(batch, (self.size, self.size), self.interpolation)
        else:
            batch = resize_shorter_side(batch, self.resize_size or self.size, self.interpolation)
            batch = center_crop(batch, (self.size, self.size))
        return normalize(batch, self.mean, self.std)


def list_offline_photos(include_grayscale: bool = False) -> list[str]:
    """List the scikit-image sample photographs that load without a download.

    Some sample images need the optional ``pooch`` package and a download.
    Those are skipped, so the list depends on the installed scikit-image.
    Returns names accepted by :func:`load_offline_photo`.
    """
    return list(load_offline_photos(include_grayscale))


def load_offline_photos(include_grayscale: bool = False) -> dict[str, np.ndarray]:
    """Load every scikit-image sample photograph that loads offline; returns name -> (H, W, 3) ``uint8`` array.

    Colour photos come first, in the order of :data:`SKIMAGE_COLOR_PHOTOS`.
    """
    names = list(SKIMAGE_COLOR_PHOTOS)
    if include_grayscale:
        names += SKIMAGE_GRAY_PHOTOS
    photos = {}
    for name in names:
        try:
            photos[name] = load_offline_photo(name)
        except DataError as exc:
            log.debug("scikit-image photo %s is not available offline: %s", name, exc)
    return photos


def load_offline_photo(name: str) -> np.ndarray:
    """Load one scikit-image sample photograph as a (H, W, 3) ``uint8`` array.

    Grayscale photos are repeated to three channels. Raises InputError for a
    name outside :data:`SKIMAGE_COLOR_PHOTOS` and :data:`SKIMAGE_GRAY_PHOTOS`,
    and DataError when the installed scikit-image cannot load it offline.
    """
    import skimage.data

    if name not in SKIMAGE_COLOR_PHOTOS + SKIMAGE_GRAY_PHOTOS:
        known = ", ".join(SKIMAGE_COLOR_PHOTOS + SKIMAGE_GRAY_PHOTOS)
        raise InputError(f"unknown scikit-image photo {name!r}; use one of {known}.")
    try:
        array = getattr(skimage.data, name)()
    except (ImportError, OSError, ValueError, AttributeError) as exc:
        raise DataError(f"scikit-image photo {name!r} cannot be loaded offline: {exc}") from exc

    array = np.asarray(array)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)  # (H, W) -> (H, W, 3)
    if array.dtype != np.uint8:
        raise DataError(f"scikit-image photo {name!r} has dtype {array.dtype}; expected uint8.")
    return array[:, :, :3]

