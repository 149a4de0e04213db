"""Give memory that a long-lived process has freed back to the system (glibc only; elsewhere a no-op).

glibc's malloc keeps one pool (arena) per thread that allocates, up to eight per core, and
keeps what is freed in them for later. A trunk server computes on gRPC's threads and a worker
on its own: the activations of a step, freed when it ends, then stay with the process as
resident memory, and a server that held four sessions still holds their memory after they
close. Two arenas bound that growth, and a trim after a session or a job ends returns the
free pages at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_ARENA_MAX = -8  # mallopt parameter, from glibc's malloc.h
ARENAS = 2


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
        return None  # not glibc (musl, macOS): nothing to tune
    return libc


def limit_malloc_arenas(count: int = ARENAS) -> bool:
    """At most ``count`` malloc arenas for the threads started from now on; True when applied.

    Call it first thing in a process, before the threads that compute are started.
    """
    libc = _libc()
    return bool(libc is not None and libc.mallopt(_M_ARENA_MAX, count))


def release_free_memory() -> bool:
    """Return the free pages of every malloc arena to the system; True when some memory was returned."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))
