"""The common life cycle of a tool run, shared by every subcommand.

``run_tool`` loads and validates the recipe, applies ``--seed`` and
``--device``, prepares the run folder, calls the tool, writes
``summary.json`` and prints the summary as JSON with ``--json``. Errors map
to exit codes: 2 for :class:`InputError` (bad recipe, data, option), 1 for
any other failure, 130 on a second Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from mmtk.core.errors import InputError, MmtkError, RecipeError
from mmtk.core.io import to_json
from mmtk.core.logging import get_logger, setup_logging
from mmtk.core.recipe import load_recipe
from mmtk.core.rundir import RunDir, default_run_path

log = get_logger(__name__)


@dataclass
class RunOptions:
    """Options every tool accepts on the command line."""

    out: Path | None = None
    json: bool = False
    seed: int | None = None
    device: str | None = None
    verbosity: int = 0
    resume: bool = False


@dataclass
class RunContext:
    """What a tool's entry point receives."""

    tool: str
    recipe: Any
    run: RunDir
    options: RunOptions
    console: Console

    def start(self) -> None:
        """Create the run folder; call after all input has been validated."""
        self.run.start(self.recipe)


def _set_top_level(recipe: Any, name: str, value: Any, option: str) -> Any:
    if not any(f.name == name for f in dataclasses.fields(recipe)):
        raise RecipeError(f"{option} is not supported by this tool: its recipe has no '{name}' key.")
    return dataclasses.replace(recipe, **{name: value})


def human_console(options: RunOptions) -> Console:
    """Return the console for tables and results: stdout, or stderr under --json."""
    return Console(stderr=options.json, soft_wrap=False)


def run_command(body: Callable[[], dict[str, Any] | None], options: RunOptions) -> int:
    """Run ``body`` with logging set up and errors mapped to exit codes.

    Prints the returned mapping as one JSON object on stdout under ``--json``.
    Returns the process exit code.
    """
    setup_logging(options.verbosity)
    try:
        summary = body()
    except MmtkError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence of the CLI
        log.exception("failed with an unexpected error: %s", exc)
        return 1
    if options.json and summary is not None:
        sys.stdout.write(to_json(summary) + "\n")
        sys.stdout.flush()
    return 0


def run_tool(
    tool: str,
    recipe_cls: type,
    recipe_ref: str | Path,
    overrides: list[str],
    options: RunOptions,
    main: Callable[[RunContext], dict[str, Any]],
) -> int:
    """Load the recipe, prepare the run folder and call ``main``; return the exit code."""

    def body() -> dict[str, Any]:
        recipe = load_recipe(recipe_cls, recipe_ref, overrides, tool=tool)
        if options.seed is not None:
            recipe = _set_top_level(recipe, "seed", options.seed, "--seed")
        if options.device is not None:
            recipe = _set_top_level(recipe, "device", options.device, "--device")

        run = RunDir(options.out or default_run_path(tool), tool, resume=options.resume)
        context = RunContext(tool=tool, recipe=recipe, run=run, options=options, console=human_console(options))
        try:
            summary = main(context)
        finally:
            run.close()
        if not run.path.is_dir():
            raise MmtkError(f"{tool} returned without starting its run folder (tool bug).")
        summary = {"tool": tool, "run_dir": str(run.path), **summary}
        run.finish(summary)
        return summary

    return run_command(body, options)


def require_file(path: str | Path, what: str) -> Path:
    """Return ``path`` if it is an existing file, else raise InputError naming ``what``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}. Check the path.")
    return path
