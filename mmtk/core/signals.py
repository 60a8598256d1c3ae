"""Graceful stop on SIGTERM/SIGINT: training loops poll a flag and checkpoint."""

from __future__ import annotations

import signal
import threading
from types import FrameType

from mmtk.core.logging import get_logger

log = get_logger(__name__)


class StopFlag:
    """Set when SIGTERM (cluster pre-emption) or SIGINT arrives during a ``with`` block.

    The loop checks :attr:`requested` between steps, saves a checkpoint and
    raises :class:`mmtk.core.errors.StopRequested`. A second SIGINT
    interrupts at once. Handlers are only installed in the main thread.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        log.warning("received %s: saving a checkpoint at the end of this step, then stopping", self.signal_name)

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
