"""The common life cycle of a tool run, shared by every subcommand.

``run_tool`` loads and validates the recipe, applies ``--seed`` and
``--device``, prepares the run folder, calls the tool, writes
``summary.json`` and prints the summary as JSON with ``--json``. Errors map
to exit codes: 2 for :class:`InputError` (bad recipe, data, option), 1 for
any other failure, 130 on a second Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Callable

from rich.console import Console

from mmtk.core.errors import InputError, MmtkError, RecipeError, Terminated
from mmtk.core.io import to_json
from mmtk.core.logging import get_logger, setup_logging
from mmtk.core.recipe import load_recipe
from mmtk.core.rundir import RunDir, default_run_path, is_main_process

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
    can_resume: bool = True  # False for commands without a --resume option


@dataclass
class RunContext:
    """Recipe, run folder, options and console passed to a tool's entry point."""

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


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated("received SIGTERM; stopped. Results this tool stores as it goes stay in the run folder; continue with --resume where the tool supports it")


def error_message(exc: BaseException) -> str:
    """Return the message of ``exc``; for an mmtk error re-raised by a DataLoader worker, only the original message.

    torch re-raises an error from a loader worker as the same class with the
    message "Caught <class> in DataLoader worker process <n>." followed by the
    worker's whole traceback, whose last line contains the original message.
    """
    text = str(exc)
    if isinstance(exc, MmtkError) and text.startswith("Caught ") and "Original Traceback" in text:
        marker = f"{type(exc).__module__}.{type(exc).__qualname__}: "
        start = text.rfind(marker)
        if start >= 0:
            return text[start + len(marker):].strip()
    return text


def run_command(body: Callable[[], dict[str, Any] | None], options: RunOptions, cleanup: Callable[[], None] | None = None) -> int:
    """Run ``body`` with logging set up and errors mapped to exit codes.

    Prints the returned mapping as one JSON object on stdout under ``--json``.
    A failed command prints ``{"error": message, "error_type": class name,
    "exit_code": code}`` there instead, so a pipeline always gets one object.
    SIGTERM outside a training loop's :class:`~mmtk.core.signals.StopFlag`
    stops the command with exit code 1 and a logged reason. ``cleanup`` runs
    after any error has been logged (a run folder's log file gets it too).
    Returns the process exit code.
    """
    setup_logging(options.verbosity)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    failure: tuple[BaseException, int] | None = None
    try:
        summary = body()
    except MmtkError as exc:
        log.error("%s", error_message(exc))
        failure = (exc, exc.exit_code)
    except Terminated as exc:
        log.error("%s", exc)
        failure = (exc, exc.exit_code)
    except KeyboardInterrupt as exc:
        log.error("interrupted")
        failure = (exc, 130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence of the CLI
        log.exception("failed with an unexpected error: %s", exc)
        failure = (exc, 1)
    finally:
        if cleanup is not None:
            cleanup()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

    # Under torchrun every rank runs the command, and one summary is enough.
    print_json = options.json and is_main_process()
    if failure is not None:
        exc, exit_code = failure
        if print_json:
            _print_json({"error": error_message(exc) or "interrupted", "error_type": type(exc).__name__, "exit_code": exit_code})
        return exit_code
    if print_json and summary is not None:
        _print_json(summary)
    return 0


def _print_json(payload: dict[str, Any]) -> None:
    sys.stdout.write(to_json(payload) + "\n")
    sys.stdout.flush()


def _check_seed_and_device(recipe: Any) -> None:
    seed = getattr(recipe, "seed", None)
    if isinstance(seed, int) and seed < 0:
        raise RecipeError(f"recipe key 'seed': {seed} is out of range; it must be >= 0.")
    device = getattr(recipe, "device", None)
    if isinstance(device, str) and device not in ("auto", "cpu"):
        from mmtk.core.distributed import resolve_device

        resolve_device(device)


def run_tool(
    tool: str,
    recipe_cls: type,
    recipe_ref: str | Path,
    overrides: list[str],
    options: RunOptions,
    main: Callable[[RunContext], dict[str, Any]],
    resumable_keys: frozenset[str] = frozenset(),
) -> int:
    """Load the recipe, prepare the run folder and call ``main``; return the exit code.

    ``resumable_keys`` names recipe keys (last components) that may change on
    ``--resume`` besides the run-length, logging and device keys.
    """

    runs: list[RunDir] = []

    def body() -> dict[str, Any]:
        recipe = load_recipe(recipe_cls, recipe_ref, overrides, tool=tool)
        if options.seed is not None:
            recipe = _set_top_level(recipe, "seed", options.seed, "--seed")
        if options.device is not None:
            recipe = _set_top_level(recipe, "device", options.device, "--device")
        _check_seed_and_device(recipe)

        run = RunDir(options.out or default_run_path(tool), tool, resume=options.resume, resumable_keys=resumable_keys, can_resume=options.can_resume)
        runs.append(run)
        context = RunContext(tool=tool, recipe=recipe, run=run, options=options, console=human_console(options))
        summary = main(context)
        if not run.path.is_dir():
            raise MmtkError(f"{tool} returned without starting its run folder (tool bug).")
        summary = {"tool": tool, "run_dir": str(run.path), **summary}
        run.finish(summary)
        return summary

    def close_run() -> None:
        for run in runs:
            run.close()

    return run_command(body, options, cleanup=close_run)


def require_file(path: str | Path, what: str) -> Path:
    """Return ``path`` if it is an existing file, else raise InputError naming ``what``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}. Check the path.")
    return path
