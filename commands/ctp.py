"""``mmtk ctp-pretrain`` and ``mmtk ctp-evaluate``: Catch-the-Patch video pretraining and its evaluation."""

from __future__ import annotations

import typer

from mmtk_commands._common import DeviceOpt, JsonOpt, OutOpt, OverridesArg, QuietOpt, RecipeArg, ResumeOpt, SeedOpt, VerboseOpt, finish, run_options


def register(app: typer.Typer) -> None:
    @app.command("ctp-pretrain")
    def ctp_pretrain(
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
        """Pretrain a video ResNet by tracking pasted patches (Catch-the-Patch, CVPR 2021)."""
        from mmtk.core.runner import run_tool
        from mmtk.ctp.pretrain import TOOL, PretrainRecipe, run

        options = run_options(out, json, seed, device, verbose, quiet, resume)
        finish(run_tool(TOOL, PretrainRecipe, recipe, list(overrides or []), options, run))

    @app.command("ctp-evaluate")
    def ctp_evaluate(
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
        """Evaluate a pretrained (or random) video backbone: fine-tuning, linear probe and clip retrieval."""
        from mmtk.core.runner import run_tool
        from mmtk.ctp.evaluate import RESUMABLE_KEYS, TOOL, EvaluateRecipe, run

        options = run_options(out, json, seed, device, verbose, quiet, resume)
        finish(run_tool(TOOL, EvaluateRecipe, recipe, list(overrides or []), options, run, resumable_keys=RESUMABLE_KEYS))
