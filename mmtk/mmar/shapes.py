"""A synthetic captioned-image data set: one coloured shape on a grey background.

Each image shows one shape (square, circle or triangle) in one colour (red,
green or blue) at a random position and size, on a mid-grey background that
is 0 in the [-1, 1] pixel range. Captions come from a few templates ("a red
circle") and every image has two question-answer pairs ("what shape is it?
circle", "what colour is it? red"). The data set is a pure function of its
seed, so tests and the CPU recipe need no data folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mmtk.core.logging import get_logger

log = get_logger(__name__)

SHAPES = ("square", "circle", "triangle")
COLOURS = ("red", "green", "blue")
# Every caption starts with "a", so that an unprompted caption is more likely than a question.
CAPTION_TEMPLATES = ("a {colour} {shape}", "a {shape} in {colour}", "a {colour} {shape} on grey")
SHAPE_QUESTION = "what shape is it?"
COLOUR_QUESTION = "what colour is it?"
BACKGROUND = 0.0
SUPERSAMPLING = 4


@dataclass
class ShapeImages:
    """Synthetic images with their labels and texts.

    Attributes:
        images: (M, 3, R, R) float32 pixels in [-1, 1].
        shapes: (M,) long index into :data:`SHAPES`.
        colours: (M,) long index into :data:`COLOURS`.
        captions: per image, every caption template filled in.
        answers: per image, the question-answer texts ("what shape is it? circle").
    """

    images: torch.Tensor
    shapes: torch.Tensor
    colours: torch.Tensor
    captions: list[list[str]]
    answers: list[list[str]]

    def __len__(self) -> int:
        return self.images.shape[0]


def caption_texts(shape: int, colour: int) -> list[str]:
    """Return every caption template filled in with a shape and a colour index."""
    return [template.format(shape=SHAPES[shape], colour=COLOURS[colour]) for template in CAPTION_TEMPLATES]


def answer_texts(shape: int, colour: int) -> list[str]:
    """Return the two question-answer texts of an image."""
    return [f"{SHAPE_QUESTION} {SHAPES[shape]}", f"{COLOUR_QUESTION} {COLOURS[colour]}"]


def vocabulary_words() -> list[str]:
    """Return every word and punctuation mark the captions and questions use, sorted."""
    words: set[str] = {".", "?"}
    for shape in range(len(SHAPES)):
        for colour in range(len(COLOURS)):
            for text in caption_texts(shape, colour) + answer_texts(shape, colour):
                words.update(text.replace("?", " ").split())
    return sorted(words)


def colour_rgb(colour: int) -> torch.Tensor:
    """Return the (3,) pixel value of a colour in [-1, 1]: the named channel at 1, the others at -1."""
    rgb = torch.full((3,), -1.0)
    rgb[colour] = 1.0
    return rgb


def shape_coverage(shape: int, resolution: int, centre: tuple[float, float], size: float) -> torch.Tensor:
    """Return the (R, R) fraction of each pixel that a shape covers, from 4 x 4 supersampling.

    ``centre`` is (row, column) and ``size`` the side (square, triangle) or
    diameter (circle), all in pixels.
    """
    fine = resolution * SUPERSAMPLING
    coords = (torch.arange(fine, dtype=torch.float32) + 0.5) / SUPERSAMPLING  # pixel units
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (F, F)
    dy, dx = rows - centre[0], cols - centre[1]
    half = size / 2

    if SHAPES[shape] == "square":
        inside = (dy.abs() <= half) & (dx.abs() <= half)
    elif SHAPES[shape] == "circle":
        inside = dy**2 + dx**2 <= half**2
    else:
        # Upright isosceles triangle: apex at the top, base at the bottom, both sides slope out by half per unit height.
        height = (dy + half) / size  # 0 at the apex row, 1 at the base row
        inside = (height >= 0) & (height <= 1) & (dx.abs() <= half * height)

    coverage = inside.float().reshape(resolution, SUPERSAMPLING, resolution, SUPERSAMPLING)
    return coverage.mean(dim=(1, 3))  # (R, R)


def draw_shape(shape: int, colour: int, resolution: int, centre: tuple[float, float], size: float) -> torch.Tensor:
    """Draw one anti-aliased shape on the grey background; returns (3, R, R) in [-1, 1]."""
    coverage = shape_coverage(shape, resolution, centre, size)  # (R, R)
    rgb = colour_rgb(colour)[:, None, None]  # (3, 1, 1)
    return BACKGROUND + coverage[None] * (rgb - BACKGROUND)  # (3, R, R)


def make_shapes(count: int, resolution: int = 16, seed: int = 0) -> ShapeImages:
    """Draw ``count`` images with uniformly random shape, colour, size and position.

    The size is uniform in [0.5 R, 0.75 R] and the centre lies within
    R / 8 of the image centre in each direction, so the shape lies fully
    inside the image. The same (count, resolution, seed) always gives the
    same data set, and a data set of more images extends a smaller one with
    the same seed.
    """
    if count < 1:
        raise ValueError(f"the number of synthetic images must be at least 1, got {count}")
    if resolution < 8:
        raise ValueError(f"synthetic images must be at least 8 px wide, got {resolution}")
    generator = torch.Generator().manual_seed(seed)
    images = torch.empty(count, 3, resolution, resolution)
    shapes = torch.empty(count, dtype=torch.long)
    colours = torch.empty(count, dtype=torch.long)
    captions, answers = [], []
    for i in range(count):
        draws = torch.rand(5, generator=generator).tolist()
        shape, colour = int(draws[0] * len(SHAPES)), int(draws[1] * len(COLOURS))
        size = resolution * (0.5 + 0.25 * draws[2])
        jitter = resolution / 8
        centre = (resolution / 2 + jitter * (2 * draws[3] - 1), resolution / 2 + jitter * (2 * draws[4] - 1))
        images[i] = draw_shape(shape, colour, resolution, centre, size)
        shapes[i], colours[i] = shape, colour
        captions.append(caption_texts(shape, colour))
        answers.append(answer_texts(shape, colour))
    log.debug("drew %d synthetic %dx%d shape images (seed %d)", count, resolution, resolution, seed)
    return ShapeImages(images, shapes, colours, captions, answers)


def shape_records(data: ShapeImages):
    """Return one :class:`mmtk.mmar.data.CaptionedImage` per image, named ``shape-00000.png`` and so on (no file exists)."""
    from mmtk.mmar.data import CaptionedImage

    return [CaptionedImage(i, Path(f"shape-{i:05d}.png"), list(data.captions[i])) for i in range(len(data))]


def shapes_tokenizer():
    """Return a word-level tokenizer over :func:`vocabulary_words`, with ids 0 pad, 1 BOS, 2 EOS, 3 unknown."""
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from mmtk.nn.tokenizer import Tokenizer

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + vocabulary_words())}
    backend = BackendTokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.add_special_tokens(specials)
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return Tokenizer(backend=backend, bos_token_id=1, eos_token_id=2, pad_token_id=0)
