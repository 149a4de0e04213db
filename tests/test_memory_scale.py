"""benchmarks/memory_scale.py: the dry-run figures of every shipped config, and the random-model writer."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from splitcore.model.part_loading import CheckpointModel
from splitcore.model.split_spec import CutBounds, SplitSpec, plan_chain

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = PROJECT_ROOT / "benchmarks" / "memory_scale.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("memory_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_scale"] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("memory_scale", None)
        raise
    yield module
    sys.modules.pop("memory_scale", None)


# Parameter counts as the model cards and a loaded model report them.
PUBLISHED = {"smollm2-1.7b": 1_711_376_384, "llama-3.2-3b": 3_212_749_824, "llama-3.1-8b": 8_030_261_248,
             "llama-3.1-70b": 70_553_706_496}


def test_every_config_is_shipped_and_counted(bench):
    names = {path.stem for path in bench.all_configs()}
    assert set(PUBLISHED) <= names
    for path in bench.all_configs():
        config = bench.load_config(path)
        counts = bench.analytic_counts(config)
        assert counts == bench.skeleton_counts(config), path.name
        model = bench.meta_skeleton(config)
        stored = sum(p.numel() for n, p in model.named_parameters(remove_duplicate=False)
                     if n not in bench.tied_keys(model))
        assert counts.total == stored
        if path.stem in PUBLISHED:
            assert counts.total == PUBLISHED[path.stem]


def test_dry_run_prints_every_config(bench, capsys):
    assert bench.main(["--dry-run", "--bottom-layers", "4", "--top-layers", "3"]) == 0
    out = capsys.readouterr().out
    for name, params in PUBLISHED.items():
        assert f"=== {name} " in out
        assert f"{params:,}" in out
    assert out.count("(meta skeleton: equal)") == len(bench.all_configs())
    assert "memory plan, cut 2+2" in out and "memory plan, cut 4+3" in out
    # SmolLM2-1.7B, cut 2+2: 20 trunk blocks of 67.1M parameters; the client the tied embeddings and 4 blocks.
    block = 4 * 2048 * 2048 + 3 * 2048 * 8192 + 2 * 2048
    counts = bench.analytic_counts(bench.load_config(bench.resolve_config("smollm2-1.7b")))
    assert counts.trunk(2, 2) == 20 * block
    assert counts.client(2, 2) == 49152 * 2048 + 4 * block + 2048
    # Llama-3.1-70B at bf16 needs two 80 GiB trunks; 8B fits one.
    assert "llama-3.1-70b      70.554B" in out
    plan = out.split("memory plan, cut 2+2")[1].splitlines()
    assert next(line for line in plan if line.startswith("llama-3.1-70b")).split()[-1] == "2"
    assert next(line for line in plan if line.startswith("llama-3.1-8b")).split()[-1] == "1"


def test_goal_and_chain_arithmetic(bench):
    assert bench.goal_bytes(10 * bench.GIB) == pytest.approx(13.5 * bench.GIB)
    per_trunk, trunks = bench.chain_trunks(bench.GIB, 100, 40 * bench.GIB)
    assert per_trunk == int(39.5 / 1.3) and trunks == 4
    assert bench.chain_trunks(bench.GIB, 100, 40 * bench.GIB, allowance=False) == (40, 3)


def test_writer_writes_a_sharded_model_that_loads(bench, tmp_path):
    config = LlamaConfig(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    config_path = tmp_path / "tiny.json"
    config_path.write_text(config.to_json_string())
    out = tmp_path / "models" / "tiny"
    bench.write_random_model(config_path, out, torch.bfloat16, shard_bytes=60_000, log=lambda *_: None)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((out / f).is_file() for f in files)
    plan = dict(bench.checkpoint_plan(config))
    assert "lm_head.weight" not in plan and set(index["weight_map"]) == set(plan)
    total = 0
    for file in files:
        with safe_open(str(out / file), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                assert index["weight_map"][key] == file
                assert tuple(tensor.shape) == plan[key] and tensor.dtype == torch.bfloat16
                total += tensor.numel() * tensor.element_size()
    assert index["metadata"]["total_size"] == total == bench.analytic_counts(config).total * 2

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.model.norm.weight, torch.ones(64, dtype=torch.bfloat16))
    std = float(model.model.layers[0].mlp.up_proj.weight.detach().float().std())
    assert 0.015 < std < 0.025
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("hello there", return_tensors="pt").input_ids
    assert int(ids.max()) < config.vocab_size
    assert model(ids).logits.shape == (1, ids.shape[1], 600)

    # The project's part loader reads only the client's pieces from the shards.
    parts = CheckpointModel(out, dtype=torch.float32)
    parts.client_parts(SplitSpec(num_layers=4, n_bottom=1, n_top=1))
    assert not any(".layers.1." in key or ".layers.2." in key for key in parts.checkpoint.keys_read)
    assert {"model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight",
            "model.norm.weight"} <= set(parts.checkpoint.keys_read)

    # A second call reuses the directory; the same seed writes the same bytes.
    stamp = (out / files[0]).stat().st_mtime_ns
    bench.write_random_model(config_path, out, torch.bfloat16, shard_bytes=60_000, log=lambda *_: None)
    assert (out / files[0]).stat().st_mtime_ns == stamp
    again = tmp_path / "again"
    bench.write_random_model(config_path, again, torch.float32, shard_bytes=10**9, log=lambda *_: None)
    assert (again / "model.safetensors").is_file() and not (again / "model.safetensors.index.json").exists()
    with safe_open(str(again / "model.safetensors"), framework="pt") as handle:
        weight = handle.get_tensor("model.layers.0.mlp.up_proj.weight")
    assert weight.dtype == torch.float32
    assert torch.equal(weight.to(torch.bfloat16), model.model.layers[0].mlp.up_proj.weight.data)


def test_writer_refuses_when_the_disk_is_short(bench, tmp_path, monkeypatch):
    config_path = bench.resolve_config("llama-3.1-8b")
    monkeypatch.setattr(bench, "free_bytes", lambda path: 1 << 30)
    with pytest.raises(SystemExit, match="not enough disk space"):
        bench.write_random_model(config_path, tmp_path / "big", torch.bfloat16, log=lambda *_: None)
    assert not (tmp_path / "big").exists()


def test_memory_readings_of_this_process(bench):
    status = bench.read_status()
    assert status["VmHWM"] >= status["VmRSS"] > 0
    poller = bench.Poller(int(Path("/proc/self/stat").read_text().split()[0]))
    poller.sample()
    poller.stop()
    assert poller.hwm >= poller.last["VmRSS"] > 0


def _assert_chain(bench, links, block_bytes, first, device_bytes):
    """Links meet end to end over exactly the given blocks, and each link's weights fit the device."""
    assert links[0].start == first and links[-1].stop == first + len(block_bytes)
    assert all(a.stop == b.start for a, b in zip(links, links[1:]))
    assert all(len(link) > 0 for link in links)
    for link in links:
        weights = sum(block_bytes[link.start - first:link.stop - first])
        assert bench.link_fits(weights, device_bytes)
        assert weights * bench.GOAL_FACTOR + bench.GOAL_SLACK <= device_bytes


@pytest.mark.parametrize("device_gib", [24, 40, 48, 80, 141])
def test_chain_plan_of_70b_covers_the_trunk_blocks_with_links_that_fit(bench, device_gib):
    counts = bench.analytic_counts(bench.load_config(bench.resolve_config("llama-3.1-70b")))
    trunk = SplitSpec(counts.num_layers, 2, 2).trunk_layers
    block_bytes = [counts.blocks[i] * bench.DTYPE_BYTES["bf16"] for i in trunk]
    links = bench.plan_chain_links(block_bytes, trunk.start, device_gib * bench.GIB)
    _assert_chain(bench, links, block_bytes, trunk.start, device_gib * bench.GIB)
    # As few links as the per-trunk count allows, and balanced: link sizes differ by one block at most.
    assert len(links) == bench.chain_trunks(block_bytes[0], len(block_bytes), device_gib * bench.GIB)[1]
    assert max(map(len, links)) - min(map(len, links)) <= 1
    # The client plans the same chain from the links' bounds: no gap, no overlap, the cut 2+2.
    plan = plan_chain([CutBounds(counts.num_layers, link, link.start, link.stop) for link in links])
    assert plan.layers == tuple(links) and (plan.spec.n_bottom, plan.spec.n_top) == (2, 2)


def test_chain_plan_of_uneven_blocks_is_the_fewest_links_with_the_smallest_largest_link(bench):
    gib = bench.GIB
    block_bytes = [3 * gib, 1 * gib, 1 * gib, 4 * gib, 2 * gib, 2 * gib, 1 * gib]
    device = bench.goal_bytes(6 * gib)  # a link may hold 6 GiB of weights
    links = bench.plan_chain_links(block_bytes, 5, device)
    _assert_chain(bench, links, block_bytes, 5, device)
    assert links == [range(5, 8), range(8, 9), range(9, 12)]  # 5, 4 and 5 GiB: 3 links, none above 5 GiB
    assert bench.plan_chain_links(block_bytes, 5, bench.goal_bytes(100 * gib)) == [range(5, 12)]
    with pytest.raises(ValueError, match="block 8 alone"):
        bench.plan_chain_links(block_bytes, 5, bench.goal_bytes(3.5 * gib))


def test_dry_run_prints_the_70b_chain_with_a_command_per_link(bench, capsys):
    assert bench.main(["--dry-run", "--config", "llama-3.1-70b,llama-3.1-8b"]) == 0
    out = capsys.readouterr().out
    table = out.split("=== chain of trunks, cut 2+2, trunk bf16")[1].splitlines()
    row = next(line for line in table if line.startswith("llama-3.1-70b")).split()
    assert row[1:4] == ["2-77", "(76)", "121.13"] and row[4:] == ["7", "4", "4", "2", "2"]
    assert next(line for line in table if line.startswith("llama-3.1-8b")).split()[4:] == ["1"] * 5
    assert "--- llama-3.1-8b" not in out  # one device holds it everywhere: no chain to list
    chain = out.split("80 and 141 GiB devices: a chain of 2 trunks")[1]
    assert "python -m trunk_server --model DIR --layers 2-39 --dtype bf16" in chain
    assert "python -m trunk_server --model DIR --layers 40-77 --dtype bf16" in chain
    assert "--trunk gpu1:50051,gpu2:50051 " in chain
    assert "24 GiB devices: a chain of 7 trunks" in out


def test_dry_run_chain_plan_follows_the_cut_dtype_and_devices(bench, capsys):
    assert bench.main(["--dry-run", "--config", "llama-3.1-70b", "--bottom-layers", "4", "--top-layers", "4",
                       "--trunk-dtype", "fp32", "--devices", "80", "--reserve-gib", "8"]) == 0
    out = capsys.readouterr().out
    table = out.split("=== chain of trunks, cut 4+4, trunk fp32")[1]
    assert "8 GiB kept free per device" in table
    # 72 blocks of 3.19 GiB; a link may hold (80 - 8 - 0.5) / 1.3 = 55 GiB: 17 blocks, so 5 links, of 15, 15,
    # 14, 14 and 14 blocks.
    assert next(line for line in table.splitlines() if line.startswith("llama-3.1-70b")).split()[1:5] == [
        "4-75", "(72)", "229.50", "5"]
    for blocks in ("4-18", "19-33", "34-47", "48-61", "62-75"):
        assert f"--layers {blocks} --dtype fp32" in table
