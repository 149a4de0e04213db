"""benchmarks/gpu_check.py runs every step on the CPU too: a bf16 trunk, the loss check, throughput, memory."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from splitcore.remote.process import PROJECT_ROOT


def test_the_gpu_check_passes_on_the_cpu_with_a_tiny_model(tiny_dirs):
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--dtype", "bf16",
         "--config", str(tiny_dirs["llama"] / "config.json"), "--steps", "3", "--batch-size", "2", "--seq-len", "16",
         "--throughput-s", "1", "--sessions", "1,2"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "trunk: cpu, bfloat16" in out
    checks = re.findall(r"split, client on (\w+): .* difference from the reference ([\d.e+-]+) .*: ok", out)
    assert [device for device, _ in checks] == ["cpu"] and 0 < float(checks[0][1]) <= 0.02
    for sessions in (1, 2):
        assert re.search(rf"throughput with {sessions} session\(s\): [\d,]+ tokens/s", out)
    assert re.search(r"sessions after 1\.\.2 sessions: [\d.]+, [\d.]+ MiB", out)
    assert out.rstrip().endswith("GPU check passed")
