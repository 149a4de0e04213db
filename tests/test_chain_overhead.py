"""benchmarks/chain_overhead.py: one trunk against chains of 2 and 3 links, on a tiny model."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from splitcore.remote.process import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "benchmarks" / "chain_overhead.py"


def test_link_ranges_share_the_trunk_blocks_out_in_order():
    spec = importlib.util.spec_from_file_location("chain_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["chain_overhead"] = module  # dataclasses look their module up while the file runs
    sys.path.insert(0, str(SCRIPT.parent))  # it reuses gpu_check's model builder
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
        sys.modules.pop("chain_overhead", None)
    assert module.link_ranges(2, 28, 1) == [range(2, 28)]
    assert module.link_ranges(2, 28, 3) == [range(2, 11), range(11, 20), range(20, 28)]
    assert module.link_ranges(1, 5, 3) == [range(1, 3), range(3, 4), range(4, 5)]
    with pytest.raises(ValueError, match="at least one"):
        module.link_ranges(1, 3, 3)


def test_the_benchmark_runs_chains_of_2_and_3_that_follow_the_single_trunk(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--steps", "3", "--batch-size", "2",
         "--seq-len", "16", "--bottom-layers", "1", "--top-layers", "1"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("trunk "))
    assert header.split() == ["trunk", "blocks", "per", "link", "median", "step", "vs", "1", "trunk", "middle", "half",
                              "per", "extra", "link", "MiB/step", "per", "link", "max", "|Δloss|"]
    rows = {}
    for line in lines[lines.index(header) + 1:lines.index(header) + 4]:
        match = re.match(r"(1 trunk|chain of \d)\s+([\d\-, ]+?)\s+([\d.]+)s\s+([\d.]+)\s+[\d.]+-[\d.]+\s+(\S+)\s+"
                         r"([\d., ]+?)\s+(\S+)$", line)
        assert match, line
        rows[match.group(1)] = match.groups()[1:]
    assert set(rows) == {"1 trunk", "chain of 2", "chain of 3"}
    assert rows["1 trunk"][0] == "1-4" and rows["1 trunk"][2] == "1.000" and rows["1 trunk"][3] == "-"
    assert rows["chain of 2"][0] == "1-2, 3-4"
    assert rows["chain of 3"][0] == "1-2, 3-3, 4-4"
    single_bytes = float(rows["1 trunk"][4])
    for name, links in (("chain of 2", 2), ("chain of 3", 3)):
        blocks, step_s, ratio, per_link, mib, delta = rows[name]
        assert float(step_s) > 0 and float(ratio) > 0 and per_link.endswith("%")
        per_link_bytes = [float(b) for b in mib.split(",")]
        # Every link receives and returns hidden states of the same shape as a single trunk does.
        assert len(per_link_bytes) == links and all(b == pytest.approx(single_bytes, rel=0.05) for b in per_link_bytes)
        assert float(delta) <= 1e-5  # a chain computes what one trunk computes, up to float32 rounding
    assert re.search(r"chain of 3: step time [\d.]+ x one trunk's, [+-][\d.]+% per extra link", result.stdout)
