"""``mmtk train-kl-autoencoder``, ``mmtk train-mmar``, ``mmtk mmar-generate`` and ``mmtk mmar-caption``."""

from __future__ import annotations

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
