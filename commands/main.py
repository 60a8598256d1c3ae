"""The ``mmtk`` entry point: one Typer app with every tool's subcommands."""

from __future__ import annotations

import importlib
import pkgutil
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
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
