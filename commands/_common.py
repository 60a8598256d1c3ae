"""Option declarations shared by every tool subcommand."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mmtk.core.runner import RunOptions

RecipeArg = Annotated[str, typer.Argument(help="Recipe: a YAML file path, or the name of a bundled recipe (see 'mmtk recipes').")]
OverridesArg = Annotated[Optional[list[str]], typer.Argument(help="Recipe overrides as dotted.key=value, for example train.lr=3e-4.")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Run folder for all outputs (default: runs/<tool>/<UTC time>-<random suffix>).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON summary object on stdout; tables go to stderr.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed; overrides the recipe's 'seed'.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="Torch device such as cpu, cuda or cuda:1; overrides the recipe's 'device'.")]
VerboseOpt = Annotated[int, typer.Option("--verbose", "-v", count=True, help="Log debug messages.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Log warnings and errors only.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its latest checkpoint.")]


def run_options(out: Optional[Path], json: bool, seed: Optional[int], device: Optional[str], verbose: int, quiet: bool, resume: Optional[bool] = None) -> RunOptions:
    """Bundle the shared options; -q wins over -v. ``resume`` is None for a command without --resume."""
    verbosity = -1 if quiet else min(verbose, 1)
    return RunOptions(out=out, json=json, seed=seed, device=device, verbosity=verbosity, resume=bool(resume), can_resume=resume is not None)


def finish(code: int) -> None:
    """Exit the process with ``code`` (0 returns normally)."""
    if code:
        raise typer.Exit(code)
