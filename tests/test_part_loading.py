"""Each process loads only its part of the model, from the checkpoint's safetensors.

The parts built from a checkpoint answer as the whole model does (every family, single and
sharded checkpoints); a client reads the embeddings, its blocks, the norm and the head and
not one tensor of the trunk's blocks, yet fingerprints the trunk's blocks as a whole model
would; frozen tensors are shared between module trees through a store with a byte budget;
a trunk casts its blocks to its dtype while it reads them.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tokenize
from transformers import AutoModelForCausalLM

from splitcore.model.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint, CheckpointError
from splitcore.model.fingerprint import weights_fingerprint
from splitcore.model.part_loading import CheckpointModel, FrozenWeightStore, PartSelection, format_layers
from splitcore.model.parts import positions_from_mask, split_model
from splitcore.model.split_spec import SplitSpec
from splitcore.model.tiny_models import TINY_ARCHS


@pytest.fixture(scope="module")
def sharded_dirs(tiny_dirs, tmp_path_factory):
    """The tiny models again, saved in shards of about 40 kB with an index."""
    root = tmp_path_factory.mktemp("sharded")
    dirs = {}
    for arch in TINY_ARCHS:
        out = root / arch
        AutoModelForCausalLM.from_pretrained(tiny_dirs[arch]).save_pretrained(out, max_shard_size="40KB")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tiny_dirs[arch] / name).is_file():
                shutil.copy(tiny_dirs[arch] / name, out / name)
        dirs[arch] = out
    return dirs


def block_keys(checkpoint: Checkpoint, layers) -> set[str]:
    return {key for key in checkpoint.tensors
            if any(f".layers.{i}." in key or f".h.{i}." in key for i in layers)}


@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_parts_from_the_checkpoint_give_the_full_models_logits(tiny_dirs, sharded_dirs, load_model, arch, sharded):
    model_dir = (sharded_dirs if sharded else tiny_dirs)[arch]
    assert (model_dir / (INDEX_FILE if sharded else SINGLE_FILE)).is_file()
    if sharded:
        assert len(set(json.loads((model_dir / INDEX_FILE).read_text())["weight_map"].values())) > 2
    full, tokenizer = load_model(arch)
    input_ids, mask, _ = tokenize(tokenizer)
    source = CheckpointModel(model_dir)
    spec = SplitSpec(source.num_layers, 2, 2)

    bottom, top = source.client_parts(spec)
    with torch.no_grad():
        logits = top(source.run_trunk(spec.trunk_layers, bottom(input_ids, mask), mask), mask).logits
        expected = full.eval()(input_ids=input_ids, attention_mask=mask,
                               position_ids=positions_from_mask(mask, mask.shape[1])).logits  # (batch, seq, vocab)

    assert (logits - expected).abs().max().item() == 0.0
    _, full_trunk, _ = split_model(full, 2, 2)
    assert source.trunk_fingerprint(spec.trunk_layers) == weights_fingerprint(full_trunk)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_client_reads_its_blocks_and_no_tensor_of_the_trunks(sharded_dirs, arch):
    source = CheckpointModel(sharded_dirs[arch])
    checkpoint = source.checkpoint
    spec = SplitSpec(source.num_layers, 2, 2)

    bottom, top = source.client_parts(spec)
    source.trunk_fingerprint(spec.trunk_layers)  # hashed from the files' bytes, never loaded

    read = set(checkpoint.keys_read)
    assert not read & block_keys(checkpoint, spec.trunk_layers)
    client_blocks = block_keys(checkpoint, [*spec.bottom_layers, *spec.top_layers])
    assert client_blocks <= read
    others = read - client_blocks
    assert others and all("embed" in key or "wte" in key or "wpe" in key or "norm" in key or "ln_f" in key
                          for key in others), sorted(others)
    assert max(checkpoint.keys_read.values()) == 1, "each tensor is read once"
    # The tied LM head is the embedding matrix itself, loaded once for Bottom and Top.
    embedding = bottom.backbone.get_submodule(source.family.embedding_attrs[0]).weight
    assert top.lm_head.weight is embedding
    # Every trunk block is still on the meta device in the module tree the parts came from.
    assert all(p.device.type != "meta" for part in (bottom, top) for p in part.parameters())


def test_two_module_trees_from_one_store_share_their_frozen_tensors(tiny_dirs):
    store = FrozenWeightStore()
    source = CheckpointModel(tiny_dirs["llama"], store=store)
    first = source.client_parts(SplitSpec(6, 2, 2))
    second = source.client_parts(SplitSpec(6, 2, 1))  # another cut: blocks 0, 1 and 5 in common

    def pointers(part):
        return {name: p.data_ptr() for name, p in part.named_parameters()}

    assert pointers(first[0]) == pointers(second[0])
    shared_top = {n: ptr for n, ptr in pointers(first[1]).items() if ".layers.4." not in n}
    assert shared_top == {n: ptr for n, ptr in pointers(second[1]).items() if n in shared_top}
    assert first[0] is not second[0] and first[0].backbone.layers["0"] is not second[0].backbone.layers["0"]
    assert max(source.checkpoint.keys_read.values()) == 1, "nothing read twice"


def test_the_store_keeps_its_budget_and_never_loads_a_tensor_still_in_use_twice(tiny_dirs):
    store = FrozenWeightStore(budget_bytes=0)
    source = CheckpointModel(tiny_dirs["llama"], store=store)
    selection = PartSelection.of([0])
    kept_alive = source.build(selection)  # a job still running on block 0
    assert store.kept_bytes > 0, "what the last request needs stays kept"

    source.build(PartSelection.of([5]))
    assert all(".layers.0." not in slot[-1] for slot in store._kept), "block 0 is out of the budget"
    again = source.build(selection)
    block0 = [k for k in source.checkpoint.keys_read if ".layers.0." in k]
    assert block0 and all(source.checkpoint.keys_read[k] == 1 for k in block0), "found alive, not read again"
    assert again.model.layers[0].self_attn.q_proj.weight is kept_alive.model.layers[0].self_attn.q_proj.weight

    del kept_alive, again
    source.build(PartSelection.of([5]))
    source.build(selection)
    assert all(source.checkpoint.keys_read[k] == 2 for k in block0), "freed, so read again"


def test_weights_take_the_compute_dtype_as_they_are_read(tiny_dirs):
    source = CheckpointModel(tiny_dirs["llama"], dtype=torch.bfloat16)
    model = source.build(PartSelection.of(range(2, 4)))

    params = dict(model.named_parameters())
    loaded = {n: p for n, p in params.items() if p.device.type != "meta"}
    assert loaded and all(p.dtype == torch.bfloat16 for p in loaded.values())
    assert all(".layers.2." in n or ".layers.3." in n for n in loaded)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32, "buffers keep their precision"
    # The fingerprint is the stored (fp32) weights', whatever the compute dtype.
    fp32 = CheckpointModel(tiny_dirs["llama"])
    assert source.trunk_fingerprint(range(2, 4)) == fp32.trunk_fingerprint(range(2, 4))


def test_a_directory_without_safetensors_is_refused_with_what_to_do(tmp_path, tiny_dirs):
    (tmp_path / "config.json").write_text((tiny_dirs["llama"] / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*convert it to safetensors"):
        CheckpointModel(tmp_path)
    (tmp_path / SINGLE_FILE).write_bytes(b"\x00\x01")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        CheckpointModel(tmp_path)


def test_layer_ranges_read_as_people_write_them():
    assert format_layers({0, 1, 28, 29, 5}) == "0-1, 5, 28-29"
    assert PartSelection.of([3, 4], embeddings=True, head=True).describe() == \
        "blocks 3-4, embeddings, norm and LM head"


def test_tensor_digests_are_hashed_once_per_machine_while_the_files_are_unchanged(tiny_dirs, tmp_path,
                                                                                   monkeypatch):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_dirs["llama"], model_dir)
    cache = tmp_path / "digests"
    first = CheckpointModel(model_dir, digest_cache=cache).trunk_fingerprint(range(2, 4))
    assert list(cache.glob("*.json")), "kept for the next process"

    def no_hashing(*args):
        raise AssertionError("hashed again")

    monkeypatch.setattr(Checkpoint, "_hash", no_hashing)
    assert CheckpointModel(model_dir, digest_cache=cache).trunk_fingerprint(range(2, 4)) == first
    monkeypatch.undo()

    weights = model_dir / SINGLE_FILE
    weights.write_bytes(weights.read_bytes())  # rewritten: a new modification time
    hashed = []
    original = Checkpoint._hash
    monkeypatch.setattr(Checkpoint, "_hash", lambda self, *args: hashed.append(args) or original(self, *args))
    assert CheckpointModel(model_dir, digest_cache=cache).trunk_fingerprint(range(2, 4)) == first
    assert hashed, "a changed file is hashed again"


def test_a_truncated_checkpoint_is_named_when_its_bytes_are_hashed(tiny_dirs, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_dirs["llama"], model_dir)
    weights = model_dir / SINGLE_FILE
    weights.write_bytes(weights.read_bytes()[:-1000])  # the header still promises the last tensor's bytes
    checkpoint = Checkpoint(model_dir)
    last = max(checkpoint.tensors, key=lambda key: checkpoint.tensors[key].end)
    with pytest.raises(CheckpointError, match=f"ends inside tensor '{last}'"):
        checkpoint.digest(last)
