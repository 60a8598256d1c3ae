"""Pictures of patch tracks: true boxes (green) against predicted boxes (magenta), as a GIF and a PNG strip."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmtk.core.io import atomic_path

TRUE_COLOUR = (40, 220, 40)
PREDICTED_COLOUR = (230, 40, 230)


def draw_track_frames(frames: np.ndarray, true_boxes: np.ndarray, predicted_boxes: np.ndarray, zoom: int = 4) -> list:
    """Draw boxes [P, T, 4] (pixels) on frames ``uint8`` [T, H, W, 3], enlarged ``zoom`` times; returns PIL images."""
    from PIL import Image, ImageDraw

    images = []
    for t, frame in enumerate(frames):
        image = Image.fromarray(frame).resize((frame.shape[1] * zoom, frame.shape[0] * zoom), Image.NEAREST)
        draw = ImageDraw.Draw(image)
        for boxes, colour, width in ((true_boxes, TRUE_COLOUR, 2), (predicted_boxes, PREDICTED_COLOUR, 2)):
            for patch in range(boxes.shape[0]):
                x1, y1, x2, y2 = (float(v) * zoom for v in boxes[patch, t])
                draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=colour, width=width)
        draw.text((3, 2), f"t={t}", fill=(255, 255, 255))
        images.append(image)
    return images


def save_gif(path: str | Path, images: list, frame_ms: int = 200) -> Path:
    """Write PIL images as a looping animated GIF (atomic)."""
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
    return Path(path)


def save_strip(path: str | Path, images: list, columns: int = 8) -> Path:
    """Write PIL images as one PNG grid, ``columns`` frames per row (atomic)."""
    from PIL import Image

    width, height = images[0].size
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        sheet.paste(image, ((index % columns) * width, (index // columns) * height))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return Path(path)
