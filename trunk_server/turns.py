"""Sessions take the model in turn, and a call whose caller gave up is dropped before it computes.

``FairLock`` hands the model to its waiters in the order they asked for it: threading's own
locks let the thread that just released take the lock again ahead of the others, so one busy
session could starve the rest. ``call_deadline`` records, per server thread, when the gRPC
call it serves stops mattering to its caller; ``check_deadline`` raises ``DeadlinePassed``
once that time has passed, so a call that waited its deadline away in the queue does not
compute (its retry is already on the way).
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time

from splitcore.remote.errors import DeadlinePassed


class FairLock:
    """A reentrant lock granted first come, first served."""

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._waiting: collections.deque[object] = collections.deque()
        self._owner: int | None = None
        self._depth = 0

    def acquire(self) -> bool:
        me = threading.get_ident()
        with self._changed:
            if self._owner == me:
                self._depth += 1
                return True
            ticket = object()
            self._waiting.append(ticket)
            while self._owner is not None or self._waiting[0] is not ticket:
                self._changed.wait()
            self._waiting.popleft()
            self._owner, self._depth = me, 1
            self._changed.notify_all()  # the next in line now heads the queue
            return True

    def release(self) -> None:
        with self._changed:
            if self._owner != threading.get_ident():
                raise RuntimeError("release of a FairLock this thread does not hold")
            self._depth -= 1
            if not self._depth:
                self._owner = None
                self._changed.notify_all()

    def waiting(self) -> int:
        """Threads in the queue now."""
        with self._changed:
            return len(self._waiting)

    def __enter__(self) -> FairLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


_local = threading.local()


@contextlib.contextmanager
def call_deadline(seconds_left: float | None):
    """Within the block, this thread serves a call whose caller waits ``seconds_left`` more seconds
    (None: no deadline)."""
    before = getattr(_local, "deadline", None)
    _local.deadline = None if seconds_left is None else time.monotonic() + seconds_left
    try:
        yield
    finally:
        _local.deadline = before


def check_deadline(what: str) -> None:
    """DeadlinePassed when the call this thread serves has passed its caller's deadline."""
    deadline = getattr(_local, "deadline", None)
    if deadline is not None and time.monotonic() >= deadline:
        late = time.monotonic() - deadline
        raise DeadlinePassed(f"{what} was dropped before it ran: its caller's deadline passed {late:.1f} s ago "
                             "while it waited for the model (the trunk is busy; a retry is answered in turn)")
