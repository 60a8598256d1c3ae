"""``mmtk train-kl-autoencoder``, ``mmtk train-mmar``, ``mmtk mmar-generate``, ``mmtk mmar-caption`` and ``mmtk download-coco-mini``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mmtk_commands._common import DeviceOpt, JsonOpt, OutOpt, OverridesArg, QuietOpt, RecipeArg, ResumeOpt, SeedOpt, VerboseOpt, finish, run_options


def register(app: typer.Typer) -> None:
    @app.command("train-kl-autoencoder")
    def train_kl_autoencoder(
        recipe: RecipeArg,
        overrides: OverridesArg = None,
        out: OutOpt = None,
        json: JsonOpt = False,
        seed: SeedOpt = None,
        device: DeviceOpt = None,
        verbose: VerboseOpt = 0,
        quiet: QuietOpt = False,
        resume: ResumeOpt = False,
    ) -> None:
        """Train a small KL autoencoder on real photos, the image tokenizer of CPU-scale MMAR runs."""
        from mmtk.core.runner import run_tool
        from mmtk.mmar.kl_autoencoder import TOOL, AutoencoderRecipe, run

        options = run_options(out, json, seed, device, verbose, quiet, resume)
        finish(run_tool(TOOL, AutoencoderRecipe, recipe, list(overrides or []), options, run))

    @app.command("train-mmar")
    def train_mmar(
        recipe: RecipeArg,
        overrides: OverridesArg = None,
        out: OutOpt = None,
        json: JsonOpt = False,
        seed: SeedOpt = None,
        device: DeviceOpt = None,
        verbose: VerboseOpt = 0,
        quiet: QuietOpt = False,
        resume: ResumeOpt = False,
    ) -> None:
        """Train MMAR (a decoder LM with a per-token diffusion head) for text-to-image and captioning."""
        from mmtk.core.runner import run_tool
        from mmtk.mmar.recipe import MMARRecipe
        from mmtk.mmar.train import TOOL, run

        options = run_options(out, json, seed, device, verbose, quiet, resume)
        finish(run_tool(TOOL, MMARRecipe, recipe, list(overrides or []), options, run))

    @app.command("mmar-generate")
    def mmar_generate(
        recipe: RecipeArg,
        overrides: OverridesArg = None,
        out: OutOpt = None,
        json: JsonOpt = False,
        seed: SeedOpt = None,
        device: DeviceOpt = None,
        verbose: VerboseOpt = 0,
        quiet: QuietOpt = False,
    ) -> None:
        """Generate images from captions with a trained MMAR model (guidance, temperature, iterations)."""
        from mmtk.core.runner import run_tool
        from mmtk.mmar.sampling import GENERATE_TOOL, GenerateRecipe, run_generate

        options = run_options(out, json, seed, device, verbose, quiet)
        finish(run_tool(GENERATE_TOOL, GenerateRecipe, recipe, list(overrides or []), options, run_generate))

    @app.command("mmar-caption")
    def mmar_caption(
        recipe: RecipeArg,
        overrides: OverridesArg = None,
        out: OutOpt = None,
        json: JsonOpt = False,
        seed: SeedOpt = None,
        device: DeviceOpt = None,
        verbose: VerboseOpt = 0,
        quiet: QuietOpt = False,
    ) -> None:
        """Caption photos with a trained MMAR model, reading their unmasked image tokens."""
        from mmtk.core.runner import run_tool
        from mmtk.mmar.sampling import CAPTION_TOOL, CaptionRecipe, run_caption

        options = run_options(out, json, seed, device, verbose, quiet)
        finish(run_tool(CAPTION_TOOL, CaptionRecipe, recipe, list(overrides or []), options, run_caption))

    @app.command("download-coco-mini")
    def download_coco_mini(
        destination: Annotated[Path, typer.Argument(help="Folder to create with images/, captions.jsonl and images.csv (coco-mini layout).")],
        base_url: Annotated[Optional[str], typer.Option("--base-url", help="URL that COCO's archive paths are appended to (default http://images.cocodataset.org/; file:// reads local copies).")] = None,
        archives: Annotated[Optional[Path], typer.Option("--archives", help="Folder to keep the downloaded zip archives in (about 1.1 GB) and reuse next time; by default they are deleted.")] = None,
        force: Annotated[bool, typer.Option("--force", help="Replace a destination folder that is not empty.")] = False,
        json: JsonOpt = False,
        verbose: VerboseOpt = 0,
        quiet: QuietOpt = False,
    ) -> None:
        """Download COCO 2017 val images and captions, check their MD5, and write the 159 val2017 photos of coco-mini at 256 px."""
        from mmtk.core.runner import run_command
        from mmtk.mmar.coco import COCO_BASE_URL, download_coco_mini as download

        options = run_options(None, json, None, None, verbose, quiet)
        finish(run_command(lambda: download(destination, COCO_BASE_URL if base_url is None else base_url, archives=archives, force=force), options))
