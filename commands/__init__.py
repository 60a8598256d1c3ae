"""Typer subcommands of the ``mmtk`` command line (installed as ``mmtk_commands``).

Each module defines ``register(app)``, which adds its subcommands. Modules
import heavy libraries (torch, pgmpy) inside the command functions so that
``mmtk --help`` stays fast.
"""
