"""benchmarks/split_overhead.py --overhead-only: split against local in interleaved rounds (tiny Llama)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from splitcore.remote.process import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "benchmarks" / "split_overhead.py"


def test_the_overhead_is_measured_in_interleaved_rounds():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--overhead-only", "--rounds", "2", "--batch-size", "2",
         "--seq-len", "16", "--steps", "3"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    rounds = re.findall(r"round (\d): local ([\d.]+) s, split ([\d.]+) s, split/local = ([\d.]+)", output)
    assert [number for number, *_ in rounds] == ["1", "2"], output[-3000:]
    ratios = [float(ratio) for *_, ratio in rounds]
    assert all(float(local) > 0 and float(split) > 0 for _, local, split, _ in rounds)
    summary = re.search(r"split/local over 2 interleaved rounds: median ([\d.]+)", output)
    assert summary and abs(float(summary.group(1)) - sum(ratios) / 2) <= 0.0015, output  # the median of two
