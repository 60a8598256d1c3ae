"""``mmtk build-causal-kg``, ``mmtk recommend-path`` and ``mmtk download-frcsub``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import DeviceOpt, JsonOpt, OutOpt, OverridesArg, QuietOpt, RecipeArg, ResumeOpt, SeedOpt, VerboseOpt, finish, run_options


def register(app: typer.Typer) -> None:
    @app.command("build-causal-kg")
    def build_causal_kg(
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
        """Learn a causal knowledge network over skills from student responses and a Q-matrix."""
        from mmtk.core.runner import run_tool
        from mmtk.causalkg.build import RESUMABLE_KEYS, run_build
        from mmtk.causalkg.recipes import BuildRecipe

        options = run_options(out, json, seed, device, verbose, quiet, resume)
        finish(run_tool("build-causal-kg", BuildRecipe, recipe, overrides or [], options, run_build, resumable_keys=RESUMABLE_KEYS))

    @app.command("recommend-path")
    def recommend_path(
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
        """Recommend an explained learning path to a target skill on a causal knowledge network."""
        from mmtk.core.runner import run_tool
        from mmtk.causalkg.pathtool import run_recommend
        from mmtk.causalkg.recipes import RecommendRecipe

        options = run_options(out, json, seed, device, verbose, quiet, resume)
        finish(run_tool("recommend-path", RecommendRecipe, recipe, overrides or [], options, run_recommend))

    @app.command("download-frcsub")
    def download_frcsub(
        destination: Annotated[Path, typer.Argument(help="Folder to write data.txt, q.txt and skills.csv into.")],
        url: Annotated[Optional[str], typer.Option("--url", help="Base URL of the folder that contains data.txt and q.txt (default: the AGCDM GitHub copy).")] = None,
        force: Annotated[bool, typer.Option("--force", help="Overwrite existing files whose content differs (for example an edited skills.csv).")] = False,
        verbose: VerboseOpt = 0,
        quiet: QuietOpt = False,
    ) -> None:
        """Download the FrcSub fraction-subtraction data and check its SHA-256 checksums."""
        from mmtk.core.runner import run_command
        from mmtk.causalkg.data import FRCSUB_BASE_URL, download_frcsub as download

        options = run_options(None, False, None, None, verbose, quiet)

        def body() -> dict:
            files = download(destination, FRCSUB_BASE_URL if url is None else url, force=force)
            return {"files": [str(f) for f in files]}

        finish(run_command(body, options))
