"""Proxy task: trajectory limits, pasted pixels, targets and the box coding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmtk.ctp.head import box_iou, ctp_loss, decode_boxes, encode_boxes
from mmtk.ctp.proxy import (
    PatchTrack,
    ProxyTaskConfig,
    alpha_mask,
    interpolate_segments,
    make_proxy_sample,
    paste_tracks,
    sample_key_frames,
    sample_track,
)

SIZE = 112
FRAMES = 16


def many_tracks(count=300, seed=0, config=None):
    rng = np.random.default_rng(seed)
    config = config or ProxyTaskConfig()
    return [sample_track(SIZE, SIZE, FRAMES, rng, config) for _ in range(count)], config


def test_key_frames_include_first_and_last():
    rng = np.random.default_rng(0)
    counts = set()
    for _ in range(200):
        keys = sample_key_frames(FRAMES, rng, [0.5, 0.3, 0.2])
        assert keys[0] == 0
        assert keys[-1] == FRAMES - 1
        assert np.all(np.diff(keys) > 0)
        counts.add(len(keys))
    assert counts == {2, 3, 4}


def test_interpolation_hits_key_values():
    keys = np.array([0, 5, 15])
    values = np.array([[0.0, 10.0], [20.0, -5.0], [3.0, 3.0]])
    for kind in ("uniform", "accelerating", "decelerating"):
        curve = interpolate_segments(keys, values, [kind, kind], FRAMES)
        assert np.allclose(curve[keys], values)


def test_centre_speed_within_limit():
    tracks, config = many_tracks()
    for track in tracks:
        speed = np.abs(np.diff(track.centers, axis=0))  # [T-1, 2] px per frame, per axis
        assert speed.max() <= config.loc_velocity + 1e-9


def test_size_change_within_limit():
    tracks, config = many_tracks()
    for track in tracks:
        change = np.abs(np.diff(np.log(track.sizes), axis=0))
        assert change.max() <= config.size_velocity + 1e-9


def test_initial_size_within_scale_limits():
    tracks, config = many_tracks()
    largest = max(config.scales) * np.sqrt(max(config.aspect_ratios)) * np.exp(config.size_jitter)
    smallest = min(config.scales) / np.sqrt(max(config.aspect_ratios)) * np.exp(-config.size_jitter)
    for track in tracks:
        assert np.all(track.sizes[0] <= min(largest, SIZE) + 1e-9)
        assert np.all(track.sizes[0] >= max(smallest, config.min_size) - 1e-9)


def test_boxes_inside_image_and_nonempty():
    tracks, _ = many_tracks()
    for track in tracks:
        boxes = track.boxes
        assert boxes.shape == (FRAMES, 4)
        assert np.all(boxes[:, :2] >= 0)
        assert np.all(boxes[:, 2:] <= SIZE)
        assert np.all(boxes[:, 2:] - boxes[:, :2] >= 1)
        assert np.all(np.abs(boxes - np.round(boxes)) == 0)


def test_first_and_source_frames_always_visible():
    tracks, _ = many_tracks()
    for track in tracks:
        assert track.visible[0]
        assert track.visible[track.source_frame]


def test_visible_fraction_near_probability():
    tracks, config = many_tracks(count=600)
    visible_flags = []
    for track in tracks:
        others = [t for t in range(1, FRAMES) if t != track.source_frame]
        visible_flags.extend(track.visible[others].tolist())
    assert np.mean(visible_flags) == pytest.approx(config.visible_prob, abs=0.02)


def make_track(boxes, visible, source_frame=0, opacity=1.0, shape="rectangle", soft=None):
    boxes = np.asarray(boxes, dtype=np.int64)
    frames = boxes.shape[0]
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2
    sizes = boxes[:, 2:] - boxes[:, :2]
    return PatchTrack(
        centers=centers, sizes=sizes, boxes=boxes, key_frames=np.array([0, frames - 1]), size_key_frames=np.array([0, frames - 1]),
        opacity=np.full(frames, opacity), visible=np.asarray(visible), source_frame=source_frame, mask_shape=shape, soft_edge_start=soft,
    )


def random_clip(frames=4, size=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (frames, 3, size, size), generator=generator).float()


def test_pasted_pixels_equal_source_patch_or_background():
    clip = random_clip()
    # Constant size, moving box: the patch is copied without resampling.
    boxes = [[2, 3, 10, 9], [5, 4, 13, 10], [8, 6, 16, 12], [12, 10, 20, 16]]
    visible = [True, True, False, True]
    track = make_track(boxes, visible, source_frame=1)
    output = paste_tracks(clip, [track])

    source = clip[1, :, 4:10, 5:13]
    for t, (x1, y1, x2, y2) in enumerate(boxes):
        if visible[t]:
            assert torch.equal(output[t, :, y1:y2, x1:x2], source)
        else:
            assert torch.equal(output[t], clip[t])
        outside = torch.ones(24, 24, dtype=torch.bool)
        outside[y1:y2, x1:x2] = False
        assert torch.equal(output[t][:, outside], clip[t][:, outside])


def test_paste_composites_with_alpha():
    clip = random_clip(frames=2)
    boxes = [[4, 4, 16, 12], [4, 4, 16, 12]]
    track = make_track(boxes, [True, True], source_frame=1, opacity=0.9, shape="ellipse", soft=0.4)
    output = paste_tracks(clip, [track])
    alpha = alpha_mask(8, 12, "ellipse", 0.4) * 0.9
    patch = clip[1, :, 4:12, 4:16]
    expected = clip[0, :, 4:12, 4:16] * (1 - alpha) + patch * alpha
    assert torch.allclose(output[0, :, 4:12, 4:16], expected)
    assert alpha.max() == pytest.approx(0.9)
    assert ((alpha > 0) & (alpha < 0.9 - 1e-6)).any()  # the soft edge


def test_soft_edge_ramp_spans_outer_band():
    # 10 px wide rectangle, ramp start 0.4 of the side: pixel centres sit at
    # 0.05, 0.15, ... of the side from the left edge, i.e. 0.45, 0.35, ... from
    # the centre. Only the outer pixel (0.45 > 0.4) is on the ramp, halfway.
    mask = alpha_mask(10, 10, "rectangle", 0.4)
    row = mask[5].tolist()
    assert row[0] == pytest.approx(0.5)
    assert row[9] == pytest.approx(0.5)
    assert row[1:9] == pytest.approx([1.0] * 8)


def test_soft_edge_start_at_half_is_hard():
    assert torch.equal(alpha_mask(6, 8, "ellipse", 0.5), alpha_mask(6, 8, "ellipse", None))


def test_patch_is_resized_when_box_size_changes():
    clip = torch.zeros(2, 3, 16, 16)
    clip[0, :, 0:4, 0:4] = 100.0  # a uniform source square
    boxes = [[0, 0, 4, 4], [6, 6, 14, 14]]  # doubled in size at frame 1
    output = paste_tracks(clip, [make_track(boxes, [True, True], source_frame=0)])
    assert torch.allclose(output[1, :, 6:14, 6:14], torch.full((3, 8, 8), 100.0))


def test_smaller_patch_pasted_on_top():
    clip = torch.zeros(1, 3, 20, 20)
    clip[0, 0] = torch.arange(20.0)[None, :].expand(20, 20)
    large = make_track([[0, 0, 16, 16]], [True])
    small = make_track([[4, 4, 8, 8]], [True])
    output = paste_tracks(clip, [small, large])
    assert torch.equal(output[0, :, 4:8, 4:8], clip[0, :, 4:8, 4:8])


def test_sample_targets_match_pasted_boxes():
    rng = np.random.default_rng(3)
    frames = np.random.default_rng(4).integers(0, 256, (FRAMES, 80, 96, 3), dtype=np.uint8)
    config = ProxyTaskConfig(scales=[12, 16], hue_saturation_prob=0, brightness_prob=0, contrast_prob=0, soft_edge_prob=0, opacity=[1.0, 1.0], num_patches=1)
    sample = make_proxy_sample(frames, rng, config, 64, [64], flip_prob=0)
    boxes = sample["boxes"][0]  # [T, 4]
    assert sample["clip"].shape == (3, FRAMES, 64, 64)

    # Replay the same draws without pasting: pixels differ only inside the target boxes.
    from mmtk.ctp import transforms as T

    replay = np.random.default_rng(3)
    clip = T.random_short_side_crop(T.to_float_clip(frames), [64], 64, replay)
    replay.uniform()  # the flip draw
    plain = T.normalize(clip)
    changed = (sample["clip"] - plain).abs().amax(dim=0) > 1e-4  # [T, H, W]
    unchanged_visible = 0
    for t in range(FRAMES):
        x1, y1, x2, y2 = (int(v) for v in boxes[t])
        inside = torch.zeros(64, 64, dtype=torch.bool)
        inside[y1:y2, x1:x2] = True
        assert not changed[t][~inside].any()
        if sample["visible"][0, t] and changed[t][inside].float().mean() < 0.5:
            unchanged_visible += 1
        if not sample["visible"][0, t]:
            assert not changed[t].any()
    assert unchanged_visible <= 1  # only the source frame, where the patch covers its own pixels


def test_box_coding_round_trip_and_zero_first_frame():
    tracks, _ = many_tracks(count=20)
    boxes = torch.as_tensor(np.stack([t.boxes for t in tracks]), dtype=torch.float64)  # [N, T, 4]
    deltas = encode_boxes(boxes)
    assert torch.all(deltas[:, 0] == 0)
    assert torch.allclose(decode_boxes(deltas, boxes[:, 0]), boxes, atol=1e-9)


def test_box_coding_known_values():
    boxes = torch.tensor([[[10.0, 20.0, 30.0, 60.0], [14.0, 18.0, 54.0, 58.0]]])  # centre (20,40)->(34,38), size (20,40)->(40,40)
    deltas = encode_boxes(boxes)[0, 1]
    expected = torch.tensor([14 / 0.8, -2 / 0.8, np.log(2) / 0.04, 0.0])
    assert torch.allclose(deltas, expected.float(), atol=1e-5)


def test_loss_values_smooth_l1():
    targets = torch.zeros(2, 3, 4)
    assert float(ctp_loss(targets.clone(), targets)["loss"]) == 0.0
    predictions = torch.zeros(2, 3, 4)
    predictions[0, 1, 0] = 0.5  # quadratic branch: 0.5 * 0.25
    predictions[1, 2, 3] = 3.0  # linear branch: 3 - 0.5
    losses = ctp_loss(predictions, targets)
    assert float(losses["loss_ctr"]) == pytest.approx(0.125 / 6)
    assert float(losses["loss_size"]) == pytest.approx(2.5 / 6)


def test_iou_known_values():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [5.0, 5.0, 6.0, 6.0]])
    assert torch.allclose(box_iou(a, b), torch.tensor([1.0, 50 / 150, 0.0]))


def test_scores_for_perfect_and_zero_predictions():
    from mmtk.ctp.pretrain import summarise_predictions

    tracks, _ = many_tracks(count=12)
    boxes = torch.as_tensor(np.stack([t.boxes for t in tracks]), dtype=torch.float32)
    perfect = summarise_predictions(encode_boxes(boxes), boxes)
    assert float(perfect["loss"]) == pytest.approx(0.0, abs=1e-5)
    assert float(perfect["iou"]) == pytest.approx(1.0, abs=1e-5)
    assert float(perfect["delta_corr"]) == pytest.approx(1.0, abs=1e-5)
    zero = summarise_predictions(torch.zeros_like(boxes), boxes)
    assert float(zero["iou"]) == pytest.approx(float(zero["baseline_iou"]), abs=1e-6)
    assert float(zero["baseline_iou"]) < 1.0
