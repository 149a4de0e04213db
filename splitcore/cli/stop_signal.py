"""Stopping a long-running command on SIGINT or SIGTERM, without a lock in the signal handler.

A handler that calls ``threading.Event.set()`` can deadlock: Python runs handlers in the main
thread between two bytecodes, and if that thread is inside ``Event.wait()`` just then, it holds
the lock that ``set()`` needs. The handler here only sets a flag.
"""

from __future__ import annotations

import signal
import time


class StopSignal:
    """Installs handlers for ``signals``; ``wait(seconds)`` returns True once one arrived."""

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM)) -> None:
        self.received: int | None = None
        for signum in signals:
            signal.signal(signum, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.received = signum

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds`` (a signal cuts the sleep short); True when a signal has arrived."""
        deadline = time.monotonic() + seconds
        while self.received is None and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))
        return self.received is not None
