"""Freed memory goes back to the system when a session or a job ends (glibc)."""

from __future__ import annotations

import subprocess
import sys

from conftest import PROJECT_ROOT

# 6000 buffers of 64 KiB (under malloc's mmap threshold, so they live in the heap), all freed but the
# last one, which pins the top of the heap: without a trim, the freed ~375 MiB stay resident.
PROGRAM = """
import torch
from splitcore.process_memory import limit_malloc_arenas, release_free_memory

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

assert limit_malloc_arenas()
buffers = [torch.ones(16 * 1024) for _ in range(6000)]
last = buffers[-1]
del buffers
before = rss()
assert release_free_memory()
print(before, rss())
"""


def test_a_trim_returns_freed_heap_memory():
    result = subprocess.run([sys.executable, "-c", PROGRAM], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    before, after = map(float, result.stdout.split())
    assert before - after > 250, (before, after)
