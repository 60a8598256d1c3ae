"""Data for MMAR: captioned photos, image preprocessing, the caption vocabulary and the HDF5 latent cache.

Latent cache schema ``mmtk.mmar.latents/1`` (one file per data set and autoencoder):

- ``moments`` (M, 2C, h, w) float32: the autoencoder posterior (mean, then
  log-variance) of each centre-cropped image, unscaled;
- ``moments_flipped`` (M, 2C, h, w) float32: the same for the mirrored image;
- ``image_ids`` (M,) int64: the COCO image id (or -1);
- ``names`` (M,) strings: the image file name;
- ``captions`` (K,) strings and ``caption_image`` (K,) int64: every caption
  with the row of its image;
- attributes ``scale_factor`` (float, multiplies latents to about unit std),
  ``resolution`` (px) and ``autoencoder`` (a description of the encoder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mmtk.core.errors import DataError, InputError
from mmtk.core.hdf5 import DatasetSpec, read_datasets, write_datasets
from mmtk.core.logging import get_logger

log = get_logger(__name__)

LATENT_SCHEMA = "mmtk.mmar.latents/1"


@dataclass
class CaptionedImage:
    """One photo and its captions."""

    image_id: int
    path: Path
    captions: list[str]
    license_id: int | None = None


def read_coco_mini(folder: str | Path) -> list[CaptionedImage]:
    """Read ``captions.jsonl`` of a coco-mini style folder (one JSON object per image, with ``file`` and ``captions``).

    Raises DataError naming the file and line when the folder, the file or
    an image is missing, a line is not valid JSON, or an image has no caption.
    """
    folder = Path(folder)
    index = folder / "captions.jsonl"
    if not index.is_file():
        raise DataError(f"caption index not found: {index}. Point data.images at a folder with captions.jsonl and images/.")
    try:
        text = index.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read caption index {index} ({exc}); write it as UTF-8 JSON lines.") from exc
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("file"), str) or not isinstance(row.get("captions"), list):
                raise TypeError("'file' must be a string and 'captions' a list of strings")
            path = folder / row["file"]
            captions = [str(c).strip() for c in row["captions"] if str(c).strip()]
            image_id = int(row.get("image_id", -1))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{index} line {number} is not a valid caption record ({exc}); expected {{\"file\": ..., \"captions\": [...]}}.") from exc
        if not captions:
            raise DataError(f"{index} line {number}: image {row['file']} has no caption.")
        if not path.is_file():
            raise DataError(f"{index} line {number}: image file not found: {path}.")
        records.append(CaptionedImage(image_id, path, captions, row.get("license_id")))
    if not records:
        raise DataError(f"{index} lists no images.")
    log.info("read %d captioned images from %s", len(records), index)
    return records


def split_heldout(records: Sequence[CaptionedImage], every: int) -> tuple[list[CaptionedImage], list[CaptionedImage]]:
    """Split into (train, held-out): every ``every``-th image in image-id order is held out (0 holds out none)."""
    ordered = sorted(records, key=lambda r: (r.image_id, str(r.path)))
    if every <= 0:
        return list(ordered), []
    train = [r for i, r in enumerate(ordered) if i % every != every - 1]
    heldout = [r for i, r in enumerate(ordered) if i % every == every - 1]
    return train, heldout


def read_prompt_file(path: str | Path) -> list[str]:
    """Read one caption per line from a text file (blank lines and ``#`` comments skipped).

    Raises InputError when the file is missing or contains no caption.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"caption file not found: {path}. Give a text file with one caption per line.")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read caption file {path}: {exc}") from exc
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise InputError(f"caption file {path} is empty: write one caption per line.")
    return prompts


# ------------------------------------------------------------------ images


def square_image(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """Centre-crop a (3, H, W) uint8 image to a square and resize it to ``resolution``; returns float (3, R, R) in [-1, 1]."""
    from mmtk.nn.image import center_crop, resize, to_float

    side = min(image.shape[-2:])
    batch = to_float(center_crop(image[None], (side, side)))  # (1, 3, S, S) in [0, 1]
    if side != resolution:
        batch = resize(batch, (resolution, resolution), "bicubic", antialias=True)
    return (batch[0].clamp(0, 1) * 2 - 1).contiguous()


def check_image_size(image: torch.Tensor, resolution: int, name: str) -> None:
    """Raise InputError when the shorter side of a (3, H, W) image is below ``resolution`` px."""
    height, width = image.shape[-2:]
    if min(height, width) < resolution:
        raise InputError(f"image {name} is {width}x{height} px, smaller than the model's {resolution}x{resolution} input; give an image whose shorter side is at least {resolution} px.")


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """Convert (B, 3, H, W) floats in [-1, 1] to (B, H, W, 3) uint8."""
    array = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).cpu().numpy()


def save_image_grid(path: str | Path, images: np.ndarray, columns: int = 8, labels: Sequence[str] | None = None) -> Path:
    """Write (B, H, W, 3) uint8 images as one PNG grid (atomic write); labels, when given, go into a sidecar .txt."""
    from PIL import Image

    from mmtk.core.io import atomic_path, write_text

    count, height, width, _ = images.shape
    columns = max(1, min(columns, count))
    rows = (count + columns - 1) // columns
    grid = np.full((rows * (height + 2), columns * (width + 2), 3), 255, dtype=np.uint8)
    for i in range(count):
        r, c = divmod(i, columns)
        grid[r * (height + 2) + 1 : r * (height + 2) + 1 + height, c * (width + 2) + 1 : c * (width + 2) + 1 + width] = images[i]
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    if labels is not None:
        write_text(path.with_suffix(".txt"), "".join(f"{i}: {label}\n" for i, label in enumerate(labels)))
    return path


# ------------------------------------------------------------- vocabulary


class CaptionVocabulary:
    """Maps a base tokenizer's ids to the ids the decoder uses.

    With ``base_ids`` (compact mode), the decoder's vocabulary is the list
    of base ids seen in the training captions, after four special entries:
    0 padding, 1 BOS, 2 EOS and 3 unknown. This keeps the output layer of a
    small decoder small. Without it, ids pass through unchanged.
    """

    PAD, BOS, EOS, UNK = 0, 1, 2, 3

    def __init__(self, tokenizer: Any, base_ids: list[int] | None, max_tokens: int = 32) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.base_ids = base_ids
        if base_ids is not None:
            self._to_compact = {base: i for i, base in enumerate(base_ids) if i >= 4}

    @classmethod
    def from_captions(cls, tokenizer: Any, captions: Sequence[str], max_tokens: int = 32) -> "CaptionVocabulary":
        """Build a compact vocabulary from the base ids that occur in ``captions``."""
        seen: set[int] = set()
        for caption in captions:
            seen.update(tokenizer.encode(normalise_caption(caption), add_special_tokens=False)[:max_tokens])
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        eos = tokenizer.eos_token_id
        specials = [eos, bos, eos, eos]
        return cls(tokenizer, specials + sorted(seen - set(specials)), max_tokens)

    @property
    def size(self) -> int:
        return len(self.base_ids) if self.base_ids is not None else int(self.tokenizer.vocab_size)

    @property
    def bos_id(self) -> int:
        if self.base_ids is not None:
            return self.BOS
        bos = self.tokenizer.bos_token_id
        return int(bos if bos is not None else self.tokenizer.eos_token_id)

    @property
    def eos_id(self) -> int:
        return self.EOS if self.base_ids is not None else int(self.tokenizer.eos_token_id)

    def encode(self, caption: str) -> list[int]:
        """Return the decoder ids of a caption, truncated to ``max_tokens``, without BOS or EOS."""
        ids = self.tokenizer.encode(normalise_caption(caption), add_special_tokens=False)[: self.max_tokens]
        if self.base_ids is None:
            return list(ids)
        return [self._to_compact.get(i, self.UNK) for i in ids]

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        """Return the decoder ids of each prompt, logging a warning for every prompt cut at ``max_tokens``."""
        encoded = []
        for index, prompt in enumerate(prompts):
            ids = self.tokenizer.encode(normalise_caption(prompt), add_special_tokens=False)
            if len(ids) > self.max_tokens:
                log.warning("prompt %d has %d tokens; the model reads only its first %d, so %d are dropped", index, len(ids), self.max_tokens, len(ids) - self.max_tokens)
            encoded.append(self.encode(prompt))
            unknown = self.count_unknown(encoded[-1])
            if unknown:
                log.warning("prompt %d (%r) has %d tokens outside the model's vocabulary; the model reads each as one unknown token", index, prompt, unknown)
        return encoded

    def count_unknown(self, ids: Sequence[int]) -> int:
        """Return how many of the decoder ids ``ids`` (from :meth:`encode`) stand for text outside the vocabulary."""
        if self.base_ids is not None:
            return sum(1 for i in ids if i == self.UNK)
        # Byte-level BPE tokenizers have no unknown token; word-level ones mark it "<unk>".
        return sum(1 for i in ids if self.tokenizer.token_text(i) == "<unk>")

    def decode(self, ids: Sequence[int]) -> str:
        """Return the text of decoder ids, dropping special entries."""
        if self.base_ids is not None:
            ids = [self.base_ids[i] for i in ids if 4 <= i < len(self.base_ids)]
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()


def normalise_caption(caption: str) -> str:
    """Collapse whitespace and end the caption with a full stop, so captions end alike.

    A text that ends with a question mark (a question prompt) keeps it and gets no full stop.
    """
    caption = " ".join(caption.split())
    return caption if caption.endswith((".", "?")) else caption + "."


def load_base_tokenizer(source: str) -> Any:
    """Load the text tokenizer: ``"bundled"`` for SmolLM2-135M's, ``"shapes"`` for the word-level one of the synthetic shapes, a ``.gguf`` file, or a Hugging Face-format folder.

    The bundled tokenizer comes from the converted SmolLM2 folder in the mmtk
    cache (converted once, on first use).
    """
    from mmtk.nn.loaders.gguf_file import open_gguf, read_metadata
    from mmtk.nn.tokenizer import Tokenizer

    if source == "shapes":
        from mmtk.mmar.shapes import shapes_tokenizer

        return shapes_tokenizer()
    if source == "bundled":
        from mmtk.nn.loaders import smollm2_directory

        return Tokenizer.from_directory(smollm2_directory())
    if source.endswith(".gguf"):
        path = Path(source)
        return Tokenizer.from_gguf_metadata(read_metadata(open_gguf(path), path), path)
    folder = Path(source)
    if not folder.is_dir():
        raise InputError(f"tokenizer folder not found: {folder}. Use 'bundled', a .gguf file or a Hugging Face model folder.")
    return Tokenizer.from_directory(folder)


# ------------------------------------------------------------ latent cache


@torch.no_grad()
def encode_images(autoencoder: Any, images: torch.Tensor, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Return posterior moments (M, 2C, h, w) of images (M, 3, R, R) and of their mirror images."""
    plain, flipped = [], []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start : start + batch_size]
        for source, out in ((chunk, plain), (chunk.flip(-1), flipped)):
            posterior = autoencoder.encode(source)
            out.append(torch.cat([posterior.mean, posterior.logvar], dim=1))
    return torch.cat(plain), torch.cat(flipped)


def write_latent_cache(path: str | Path, records: Sequence[CaptionedImage], moments: torch.Tensor, moments_flipped: torch.Tensor, scale_factor: float, resolution: int, description: str) -> Path:
    """Write the latent cache (schema ``mmtk.mmar.latents/1``, see the module docstring)."""
    captions, owners = [], []
    for row, record in enumerate(records):
        captions.extend(record.captions)
        owners.extend([row] * len(record.captions))
    return write_datasets(
        path,
        {
            "moments": moments.float().numpy(),
            "moments_flipped": moments_flipped.float().numpy(),
            "image_ids": np.array([r.image_id for r in records], dtype=np.int64),
            "names": [r.path.name for r in records],
            "captions": captions,
            "caption_image": np.array(owners, dtype=np.int64),
        },
        schema=LATENT_SCHEMA,
        attrs={"scale_factor": float(scale_factor), "resolution": int(resolution), "autoencoder": description},
    )


@dataclass
class LatentCache:
    """The arrays of a latent cache file."""

    moments: torch.Tensor
    moments_flipped: torch.Tensor
    image_ids: list[int]
    names: list[str]
    captions: list[list[str]]
    scale_factor: float
    resolution: int


def read_latent_cache(path: str | Path) -> LatentCache:
    """Read and validate a latent cache; raises DataError for a missing, foreign or inconsistent file."""
    specs = {
        "moments": DatasetSpec(("images", None, None, None)),
        "moments_flipped": DatasetSpec(("images", None, None, None)),
        "image_ids": DatasetSpec(("images",), kind="i"),
        "names": DatasetSpec(("images",), kind="S"),
        "captions": DatasetSpec(("captions",), kind="S"),
        "caption_image": DatasetSpec(("captions",), kind="i"),
    }
    arrays, attrs = read_datasets(path, specs, schema=LATENT_SCHEMA)
    log.debug("read the latent cache %s: moments %s, %d captions", path, tuple(arrays["moments"].shape), len(arrays["captions"]))
    if arrays["moments"].shape != arrays["moments_flipped"].shape:
        raise DataError(f"latent cache {path}: moments and moments_flipped differ in shape; rebuild the cache.")
    count = arrays["moments"].shape[0]
    captions: list[list[str]] = [[] for _ in range(count)]
    for caption, owner in zip(arrays["captions"], arrays["caption_image"].tolist()):
        if not 0 <= owner < count:
            raise DataError(f"latent cache {path}: caption_image {owner} is outside 0..{count - 1}; rebuild the cache.")
        captions[owner].append(caption)
    if any(not c for c in captions):
        raise DataError(f"latent cache {path}: some images have no caption; rebuild the cache.")
    for key in ("scale_factor", "resolution"):
        if key not in attrs:
            raise DataError(f"latent cache {path} lacks the '{key}' attribute; rebuild the cache.")
    return LatentCache(
        moments=torch.from_numpy(np.asarray(arrays["moments"], dtype=np.float32)),
        moments_flipped=torch.from_numpy(np.asarray(arrays["moments_flipped"], dtype=np.float32)),
        image_ids=[int(i) for i in arrays["image_ids"]],
        names=list(arrays["names"]),
        captions=captions,
        scale_factor=float(attrs["scale_factor"]),
        resolution=int(attrs["resolution"]),
    )


def sample_latents(moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw latents from posterior moments (..., 2C, h, w) -> (..., C, h, w)."""
    mean, logvar = moments.chunk(2, dim=-3)
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise
