"""The ``mmtk`` entry point: one Typer app with every tool's subcommands."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import Annotated, Optional

import typer

import mmtk

app = typer.Typer(
    name="mmtk",
    help="Research tools for multimodal generation, understanding, motion, video, chemistry and education data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"mmtk {mmtk.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the mmtk version and exit.")] = None,
) -> None:
    """Run one research tool per subcommand: mmtk TOOL RECIPE [key=value ...]."""


def _register_all() -> None:
    package = importlib.import_module(__package__ or "mmtk_commands")
    for module_info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if module_info.name.startswith("_") or module_info.name == "main":
            continue
        module = importlib.import_module(f"{package.__name__}.{module_info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)


_register_all()


def main() -> None:
    """Console-script entry point.

    Usage errors (an unknown option, a missing argument) are reported by
    click before any tool runs. Under ``--json`` they also go to stdout as one
    ``{"error", "error_type", "exit_code"}`` object, like the errors of a failed tool.
    """
    if "--json" not in sys.argv[1:]:
        app()
        return

    from mmtk.core.io import to_json

    try:
        code = typer.main.get_command(app).main(standalone_mode=False)
    except Exception as exc:
        # Typer releases differ in which click package raises these, so test the interface, not the class.
        if type(exc).__name__ == "Abort":
            sys.exit(130)
        if not (hasattr(exc, "format_message") and hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int)):
            raise
        exc.show()
        sys.stdout.write(to_json({"error": exc.format_message(), "error_type": type(exc).__name__, "exit_code": exc.exit_code}) + "\n")
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
