"""Fréchet distance of MMAR samples to real coco-mini photos, v- against eps-prediction after the same training.

Trains two models with the same recipe, seed and data that differ only in
``model.pred``, or reuses finished runs given with ``--runs``. Each model
generates one image per caption for the same prompts with the same seed.
The script compares EfficientNet-lite0 pooled features (1280-d, images
upsampled to 224 px) of the samples with those of the real photos (centre
crops at the model resolution). Also reported: the autoencoder's own reconstructions of the
real photos, a floor that no generator on these latents can beat.

NOT comparable to standard FID (Inception-v3, 50k samples): a different
feature extractor, 64 px images and a few hundred samples.

    .venv/bin/python benchmarks/mmar_frechet.py --autoencoder runs/kl-autoencoder/autoencoder.pt --out runs/mmar-frechet
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


def train(out: Path, pred: str, args: argparse.Namespace, cache: Path | None) -> Path:
    command = [sys.executable, "-m", "mmtk_commands.main", "train-mmar", "small", "--out", str(out), "-q",
               f"model.pred={pred}", f"autoencoder.checkpoint={args.autoencoder}", f"data.images={args.images}",
               "sample.num_images=0", "sample.num_captions=0", *args.override]
    if cache is not None:
        command.append(f"data.latent_cache={cache}")
    started = time.perf_counter()
    subprocess.run(command, check=True)
    print(f"trained pred={pred} in {time.perf_counter() - started:.0f} s -> {out}", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--autoencoder", type=Path, required=True, help="autoencoder.pt from mmtk train-kl-autoencoder")
    parser.add_argument("--images", type=Path, default=Path("../shared/data/coco-mini"))
    parser.add_argument("--out", type=Path, default=Path("runs/mmar-frechet"))
    parser.add_argument("--runs", type=Path, nargs=2, metavar=("V_RUN", "EPS_RUN"), help="reuse finished train-mmar runs instead of training")
    parser.add_argument("--samples", type=int, default=239, help="generated images per model (prompts: the first caption of each photo, cycling)")
    parser.add_argument("--steps", type=int, default=50, help="diffusion sampling steps")
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("override", nargs="*", help="extra train-mmar overrides for both runs, e.g. train.steps=400")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from mmtk.mmar.data import read_coco_mini, square_image, to_uint8_images
    from mmtk.mmar.sampling import decode_tokens, encode_images_to_tokens, generate_images, load_mmar
    from mmtk.nn.image import load_image
    from mmtk.nn.vision.efficientnet import EfficientNetLite0
    from mmtk.nn.vision.frechet import frechet_distance

    started = time.perf_counter()
    if args.runs:
        runs = {"v": args.runs[0], "eps": args.runs[1]}
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        first = train(args.out / "pred-v", "v", args, None)
        cache = first / "latents.h5"
        runs = {"v": first, "eps": train(args.out / "pred-eps", "eps", args, cache if cache.is_file() else None)}

    records = sorted(read_coco_mini(args.images), key=lambda r: r.image_id)
    encoder = EfficientNetLite0()
    loaded = {name: load_mmar(run / "model.pt") for name, run in runs.items()}
    resolution = loaded["v"].resolution
    real = torch.stack([square_image(load_image(r.path), resolution) for r in records])
    real_features = encoder.pooled_features(torch.from_numpy(to_uint8_images(real)).permute(0, 3, 1, 2))

    prompts = [records[i % len(records)].captions[0] for i in range(args.samples)]
    sample = argparse.Namespace(iterations=args.iterations, steps=args.steps, cfg=args.cfg, cfg_schedule="linear", temperature=1.0, eta=1.0)
    results = {}
    with torch.no_grad():
        reconstructed = decode_tokens(loaded["v"], encode_images_to_tokens(loaded["v"], real))
    results["autoencoder reconstructions (floor)"] = frechet_distance(encoder.pooled_features(torch.from_numpy(to_uint8_images(reconstructed)).permute(0, 3, 1, 2)), real_features)
    for name, model in loaded.items():
        generation_started = time.perf_counter()
        images = generate_images(model, prompts, sample, torch.Generator().manual_seed(0))
        features = encoder.pooled_features(torch.from_numpy(to_uint8_images(images)).permute(0, 3, 1, 2))
        results[f"pred={name}"] = frechet_distance(features, real_features)
        print(f"generated {len(prompts)} images with pred={name} in {time.perf_counter() - generation_started:.0f} s", file=sys.stderr)

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}, {len(prompts)} samples vs {len(records)} real photos at {resolution} px, total {time.perf_counter() - started:.0f} s")
    print("| images | Fréchet distance (EfficientNet-lite0, not FID) |")
    print("|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.2f} |")
    print(f"ratio eps / v: {results['pred=eps'] / results['pred=v']:.2f}")
    print(json.dumps({k: float(v) for k, v in results.items()}))


if __name__ == "__main__":
    main()
