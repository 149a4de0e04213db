"""Waiting in tests for what happens elsewhere (another process, thread or server): poll, never sleep blind."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], what: str, timeout: float = 30, observed: Callable[[], Any] | None = None,
               interval: float = 0.05, pause: Callable[[float], Any] = time.sleep) -> T:
    """Poll ``condition`` until it returns something true, and return that; fail saying ``what`` (and
    ``observed()``, what was seen) after ``timeout`` seconds.

    ``interval``: the seconds between polls (polls of the SQLite test database, which the worker processes
    write too, take 0.2). ``pause``: how to wait between polls, where waiting must do work of its own (a
    Playwright page handles its events only inside ``page.wait_for_timeout``).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout} s: {what}{_seen(observed)}")
        pause(interval)


def _seen(observed: Callable[[], Any] | None) -> str:
    if observed is None:
        return ""
    seen = observed()
    if isinstance(seen, str) and "\n" in seen:
        return f"; seen:\n{seen}"  # a log's tail, readable as it was written
    return f" (seen: {seen!r})"
