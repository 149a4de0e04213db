"""Running ``python -m splitcore`` as a user runs it, from the project root."""

from __future__ import annotations

import subprocess
import sys

from conftest import PROJECT_ROOT


def splitcore_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the CLI; output decoded without newline translation (generated text may hold a bare \\r)."""
    result = subprocess.run([sys.executable, "-m", "splitcore", *args], capture_output=True,
                            cwd=PROJECT_ROOT, timeout=timeout, env=env)
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result
