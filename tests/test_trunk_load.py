"""benchmarks/trunk_load.py, shortened: 8 training clients at once on one real trunk server (tiny Llama)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from splitcore.remote.process import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "benchmarks" / "trunk_load.py"


def test_eight_clients_at_once_all_finish_and_take_the_trunk_in_turn():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--clients", "8", "--steps", "10", "--rows", "2", "--positions", "32"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    output = result.stdout + result.stderr
    assert "8 of 8 runs finished" in output, output[-3000:]
    fairness = float(re.search(r"the fastest ([\d.]+)x as far as the slowest", output).group(1))
    assert fairness <= 1.5, output[-3000:]
    assert result.returncode == 0, output[-3000:]
    rows = {line.split("|")[1].strip(): line for line in output.splitlines() if re.match(r"\| \d+ \|", line)}
    assert set(rows) == {"1", "8"}
    for line in rows.values():  # p50 and p95 of every call, the rate, and the rate against one client
        assert len(re.findall(r"\d+ / \d+ ms", line)) == 3 and re.search(r"[\d.]+x \|$", line), line
