"""Logging to stderr (through rich on a terminal), plus a plain-text log file per run."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler

LOGGER_NAME = "mmtk"

_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_STREAM_FORMAT = "[%(asctime)s] %(levelname)s %(message)s"


def setup_logging(verbosity: int = 0) -> logging.Logger:
    """Send mmtk's logs to stderr; ``verbosity`` -1 warnings only, 0 info, 1 debug."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    for handler in list(logger.handlers):
        if getattr(handler, "_mmtk_console", False):
            logger.removeHandler(handler)

    handler: logging.Handler
    if sys.stderr.isatty():
        handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False, log_time_format="[%X]")
    else:
        # Pipelines and cluster logs get whole lines: rich would fold or cut
        # long messages, such as file paths, at the console width.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_STREAM_FORMAT, datefmt="%H:%M:%S"))
    handler._mmtk_console = True  # type: ignore[attr-defined]
    handler.setLevel(level)
    logger.addHandler(handler)
    logger.propagate = False
    return logger


def add_file_log(path: Path) -> logging.Handler:
    """Also append mmtk's logs (at least info level) to ``path``."""
    logger = logging.getLogger(LOGGER_NAME)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    handler.setLevel(logging.INFO)
    logger.addHandler(handler)
    if logger.level > logging.INFO or logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    return handler


def remove_handler(handler: logging.Handler) -> None:
    """Detach and close a handler added by :func:`add_file_log`."""
    logging.getLogger(LOGGER_NAME).removeHandler(handler)
    handler.close()


def get_logger(name: str) -> logging.Logger:
    """Return a logger under the ``mmtk`` namespace (pass ``__name__``)."""
    if name == LOGGER_NAME or name.startswith(LOGGER_NAME + "."):
        return logging.getLogger(name)
    return logging.getLogger(f"{LOGGER_NAME}.{name}")
