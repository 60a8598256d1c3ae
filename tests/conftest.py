"""Shared fixtures: the real data sets in ../shared/data and a CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MMTK_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of the real development data sets; skips the test when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent; set MMTK_SHARED_DATA to its path")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _torch_threads():
    """Keep torch to one thread per test so tests behave alike on loaded machines."""
    try:
        import torch
    except ImportError:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _caplog_sees_mmtk(caplog, monkeypatch):
    """Attach caplog to the ``mmtk`` logger itself.

    A command's logging set-up stops that logger from propagating, so without
    this a test would see mmtk's records only when it ran before any command.
    Propagation stays off during the test, so no record is captured twice.
    """
    import logging

    logger = logging.getLogger("mmtk")
    monkeypatch.setattr(logger, "propagate", False)
    logger.addHandler(caplog.handler)
    yield
    logger.removeHandler(caplog.handler)


@pytest.fixture()
def cli():
    """Invoke the mmtk Typer app in-process; returns a function(args) -> Result."""
    from typer.testing import CliRunner

    from mmtk_commands.main import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke
