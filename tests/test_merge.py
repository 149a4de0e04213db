"""An exported adapter merges into its base model: an ordinary model directory with the adapted logits."""

from __future__ import annotations

import copy
import errno
import json
import re
import weakref
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import tokenize
from lora_helpers import trained_parts
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from splitcore import LoraSettings, export_parts_adapter
from splitcore.model import merge
from splitcore.model.lora import IA3_FEEDFORWARD
from splitcore.model.merge import MODEL_INDEX, MODEL_WEIGHTS, MergeError, merge_adapter


def logits(model, tokenizer) -> torch.Tensor:
    input_ids, attention_mask, _ = tokenize(tokenizer)
    with torch.no_grad():
        return model.eval()(input_ids=input_ids, attention_mask=attention_mask).logits  # (batch, seq, vocab)


def assert_merged_matches_adapter(base_dir, adapter_dir, merged_dir, tolerance: float = 1e-5) -> None:
    """The merged directory loads without peft and answers as base + adapter does (and not as the base)."""
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not isinstance(merged, PeftModel) and not hasattr(merged, "peft_config")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    expected, got = logits(adapted, tokenizer), logits(merged, tokenizer)
    assert (got - expected).abs().max().item() <= tolerance
    base = logits(AutoModelForCausalLM.from_pretrained(base_dir), tokenizer)
    assert (got - base).abs().max().item() > 1e-3, "the adapter must change the model"


def assert_plain_model_directory(merged_dir) -> None:
    names = sorted(path.name for path in merged_dir.iterdir())
    assert {"config.json", "generation_config.json", MODEL_WEIGHTS, "tokenizer.json"} <= set(names)
    assert not any(name.startswith("adapter_") or name.endswith((".bin", ".pt")) for name in names), names
    with safe_open(str(merged_dir / MODEL_WEIGHTS), framework="pt") as weights:
        keys = list(weights.keys())
    assert keys and not any("lora_" in key or "base_layer" in key for key in keys), "no adapter weights left"
    assert not [path for path in merged_dir.parent.iterdir() if ".staging-" in path.name], "staging left behind"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("settings", [LoraSettings(r=4, alpha=8), LoraSettings(r=4, alpha=8, use_dora=True)],
                         ids=["lora", "dora"])
def test_an_adapter_exported_from_the_parts_merges_with_the_same_logits(tiny_dirs, tmp_path, arch, settings):
    model_dir = tiny_dirs[arch]
    family, parts = trained_parts(model_dir, settings)
    adapter = export_parts_adapter(parts, tmp_path / "adapter", family, settings, str(model_dir))

    merged = merge_adapter(model_dir, adapter, tmp_path / "merged")

    assert merged == tmp_path / "merged"
    assert_plain_model_directory(merged)
    assert_merged_matches_adapter(model_dir, adapter, merged)
    base_tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert tokenizer.get_vocab() == base_tokenizer.get_vocab()
    assert tokenizer.chat_template == base_tokenizer.chat_template
    generation = json.loads((merged / "generation_config.json").read_text())
    assert generation["pad_token_id"] == base_tokenizer.pad_token_id


def randomised_adapter(model_dir, config, out_dir, around: float = 0.0):
    """A peft adapter of ``config`` on the whole model, every adapter weight random (none a no-op)."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), copy.deepcopy(config))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _name, param in model.named_parameters():
            if param.requires_grad:  # peft leaves only the adapter's weights trainable
                param.copy_(around + 0.1 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(out_dir)
    return out_dir


OTHER_ADAPTER_TYPES = {
    "loha": (LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), 0.0),
    "lokr": (LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), 0.0),
    # IA3 scales activations: its vectors start at one.
    "ia3": (IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]), 1.0),
}


@pytest.mark.parametrize("kind", OTHER_ADAPTER_TYPES)
def test_other_adapter_types_merge_with_the_same_logits(tiny_dirs, tmp_path, kind):
    config, around = OTHER_ADAPTER_TYPES[kind]
    adapter = randomised_adapter(tiny_dirs["llama"], config, tmp_path / "adapter", around)
    merged = merge_adapter(tiny_dirs["llama"], adapter, tmp_path / "merged")
    assert_plain_model_directory(merged)
    assert_merged_matches_adapter(tiny_dirs["llama"], adapter, merged)


def test_the_merged_model_keeps_the_base_models_dtype(tiny_dirs, tmp_path):
    base_dir = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).to(torch.bfloat16).save_pretrained(base_dir)
    AutoTokenizer.from_pretrained(tiny_dirs["llama"]).save_pretrained(base_dir)
    settings = LoraSettings(r=4, alpha=8)
    family, parts = trained_parts(tiny_dirs["llama"], settings)
    adapter = export_parts_adapter(parts, tmp_path / "adapter", family, settings, str(base_dir))

    merged = merge_adapter(base_dir, adapter, tmp_path / "merged")

    with safe_open(str(merged / MODEL_WEIGHTS), framework="pt") as weights:
        dtypes = {weights.get_tensor(key).dtype for key in weights.keys()}
    assert dtypes == {torch.bfloat16}
    assert_same_tensors_as_the_full_model_merge(base_dir, adapter, merged)
    assert json.loads((merged / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(merged, dtype="auto")
    assert reloaded.dtype == torch.bfloat16
    # bf16 keeps about 3 significant digits: the merged weights round where the adapter's update did not.
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto"), adapter)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    expected, got = logits(adapted, tokenizer).float(), logits(reloaded, tokenizer).float()
    assert (got - expected).abs().max().item() <= 0.05 * expected.abs().max().item()


def test_a_failure_while_writing_leaves_nothing(tiny_dirs, tmp_path, monkeypatch):
    settings = LoraSettings(r=2, alpha=4)
    family, parts = trained_parts(tiny_dirs["gpt2"], settings)
    adapter = export_parts_adapter(parts, tmp_path / "adapter", family, settings, "base")
    out_parent = tmp_path / "out"
    out_parent.mkdir()

    def disk_full(self, *args, **kwargs):  # the weights are written by then; the tokenizer finds the disk full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        merge_adapter(tiny_dirs["gpt2"], adapter, out_parent / "merged")
    assert list(out_parent.iterdir()) == [], "neither the model directory nor its staging directory is left"


def test_what_cannot_be_merged_is_refused_with_a_reason(tiny_dirs, tmp_path):
    settings = LoraSettings(r=2, alpha=4)
    family, parts = trained_parts(tiny_dirs["gpt2"], settings)
    gpt2_adapter = export_parts_adapter(parts, tmp_path / "gpt2-adapter", family, settings, "base")

    with pytest.raises(MergeError, match="does not fit the base model"):
        merge_adapter(tiny_dirs["llama"], gpt2_adapter, tmp_path / "a")
    with pytest.raises(MergeError, match="not a PEFT adapter directory"):
        merge_adapter(tiny_dirs["llama"], tmp_path, tmp_path / "b")
    prompt = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]),
                            PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    prompt.save_pretrained(tmp_path / "prompt-adapter")
    with pytest.raises(MergeError, match="PROMPT_TUNING adapter adds virtual tokens"):
        merge_adapter(tiny_dirs["llama"], tmp_path / "prompt-adapter", tmp_path / "c")
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="exists already"):
        merge_adapter(tiny_dirs["gpt2"], gpt2_adapter, tmp_path / "taken")
    assert not any((tmp_path / name).exists() for name in "abc")


# ------------------------------------------------------------------ streaming shard by shard


def checkpoint_files(directory) -> list[str]:
    index = directory / MODEL_INDEX
    return sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [MODEL_WEIGHTS]


def read_tensors(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in checkpoint_files(directory):
        with safe_open(str(directory / name), framework="pt") as weights:
            tensors.update({key: weights.get_tensor(key) for key in weights.keys()})
    return tensors


def full_model_merge(base_dir, adapter_dir) -> dict[str, torch.Tensor]:
    """What merge_adapter did before it streamed: the whole model loaded, peft's merge_and_unload on it."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().state_dict()


def assert_same_tensors_as_the_full_model_merge(base_dir, adapter_dir, merged_dir) -> None:
    expected, got = full_model_merge(base_dir, adapter_dir), read_tensors(merged_dir)
    assert set(got) == set(read_tensors(base_dir)), "the base checkpoint's tensor names, no more, no fewer"
    for key, tensor in got.items():
        assert tensor.dtype == expected[key].dtype, key
        assert (tensor.float() - expected[key].float()).abs().max().item() <= 1e-6, key


@pytest.fixture(scope="module")
def sharded_dirs(tiny_dirs, tmp_path_factory) -> dict[str, Path]:
    """The tiny llama (tied embeddings) and gpt2 (biases) saved in ~100 KB shards: 11 and 14 files."""
    root = tmp_path_factory.mktemp("sharded-models")
    dirs = {}
    for arch in ("llama", "gpt2"):
        dirs[arch] = root / arch
        AutoModelForCausalLM.from_pretrained(tiny_dirs[arch]).save_pretrained(dirs[arch], max_shard_size="100KB")
        AutoTokenizer.from_pretrained(tiny_dirs[arch]).save_pretrained(dirs[arch])
        assert len(checkpoint_files(dirs[arch])) > 5
    return dirs


def test_a_sharded_base_merges_into_shards_that_load_alone(sharded_dirs, tmp_path):
    base_dir = sharded_dirs["llama"]
    settings = LoraSettings(r=4, alpha=8)
    family, parts = trained_parts(base_dir, settings)
    adapter = export_parts_adapter(parts, tmp_path / "adapter", family, settings, str(base_dir))

    merged = merge_adapter(base_dir, adapter, tmp_path / "merged", max_shard_size="200KB")

    index = json.loads((merged / MODEL_INDEX).read_text())
    files = checkpoint_files(merged)
    assert len(files) > 1 and not (merged / MODEL_WEIGHTS).exists()
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    total = 0
    for name in files:
        with safe_open(str(merged / name), framework="pt") as weights:
            assert set(weights.keys()) == {key for key, file in index["weight_map"].items() if file == name}
            sizes = [weights.get_tensor(key).nbytes for key in weights.keys()]
        assert sum(sizes) <= 200_000 or len(sizes) == 1, "a shard past the limit holds one big tensor only"
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    assert "lm_head.weight" not in index["weight_map"], "the LM head stays tied to the embeddings"
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= {p.name for p in merged.iterdir()}
    assert_merged_matches_adapter(base_dir, adapter, merged)


SAME_AS_FULL_MERGE = {
    "llama-lora": ("llama", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), 0.0),
    "llama-dora": ("llama", LoraConfig(r=4, lora_alpha=8, use_dora=True, use_rslora=True,
                                       target_modules=["k_proj", "o_proj", "up_proj"]), 1.0),
    "llama-loha": ("llama", OTHER_ADAPTER_TYPES["loha"][0], 0.0),
    # GPT-2: transposed Conv1D weights with biases; IA3 scales the bias of the modules it scales the output of.
    "gpt2-ia3": ("gpt2", IA3Config(target_modules=["c_attn", "c_proj", "c_fc"], feedforward_modules=IA3_FEEDFORWARD,
                                   fan_in_fan_out=True), 1.0),
}


@pytest.mark.parametrize("case", SAME_AS_FULL_MERGE)
def test_the_streamed_merge_equals_peft_merging_the_whole_model(sharded_dirs, tmp_path, case):
    arch, config, around = SAME_AS_FULL_MERGE[case]
    adapter = randomised_adapter(sharded_dirs[arch], config, tmp_path / "adapter", around)
    merged = merge_adapter(sharded_dirs[arch], adapter, tmp_path / "merged", max_shard_size="300KB")
    assert_same_tensors_as_the_full_model_merge(sharded_dirs[arch], adapter, merged)


def test_a_gpt2_checkpoint_without_the_transformer_prefix_merges_under_its_own_names(tiny_dirs, tmp_path):
    # As the Hub's gpt2 stores it: "h.0.attn.c_attn.weight" for the module path "transformer.h.0.attn.c_attn".
    base_dir = tmp_path / "hub-gpt2"
    base_dir.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        (base_dir / name).write_bytes((tiny_dirs["gpt2"] / name).read_bytes())
    save_file({key.removeprefix("transformer."): tensor for key, tensor in read_tensors(tiny_dirs["gpt2"]).items()},
              str(base_dir / MODEL_WEIGHTS), metadata={"format": "pt"})
    settings = LoraSettings(r=4, alpha=8)
    family, parts = trained_parts(tiny_dirs["gpt2"], settings)
    adapter = export_parts_adapter(parts, tmp_path / "adapter", family, settings, str(base_dir))

    merged = merge_adapter(base_dir, adapter, tmp_path / "merged")

    assert set(read_tensors(merged)) == set(read_tensors(base_dir))
    assert not any(key.startswith("transformer.") for key in read_tensors(merged))
    assert_merged_matches_adapter(base_dir, adapter, merged)


def test_the_merge_reads_one_shard_at_a_time_and_each_tensor_once(sharded_dirs, tmp_path, monkeypatch):
    base_dir = sharded_dirs["llama"]
    adapter = randomised_adapter(base_dir, OTHER_ADAPTER_TYPES["lokr"][0], tmp_path / "adapter")
    base_keys = set(json.loads((base_dir / MODEL_INDEX).read_text())["weight_map"])
    limit = 100_000
    largest_module = max(t.nbytes for t in read_tensors(base_dir).values())  # an adapted module: one weight, no bias
    reads, events, live = Counter(), [], []  # live: (weak reference, bytes) of every tensor read
    open_now = [0]
    peak = {"open": 0, "live_bytes": 0}

    class Reader:
        def __init__(self, weights):
            self.weights = weights

        def keys(self):
            return self.weights.keys()

        def get_tensor(self, key):
            reads[key] += 1
            tensor = self.weights.get_tensor(key)
            live.append((weakref.ref(tensor), tensor.nbytes))
            peak["live_bytes"] = max(peak["live_bytes"], sum(size for ref, size in live if ref() is not None))
            return tensor

    real_open, real_save = merge.safe_open, merge.save_file

    @contextmanager
    def recording_open(path, framework):
        with real_open(path, framework=framework) as weights:
            open_now[0] += 1
            peak["open"] = max(peak["open"], open_now[0])
            events.append(("open", Path(path).name))
            try:
                yield Reader(weights)
            finally:
                open_now[0] -= 1

    def recording_save(tensors, path, metadata=None):
        events.append(("write", sum(t.nbytes for t in tensors.values())))
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(merge, "safe_open", recording_open)
    monkeypatch.setattr(merge, "save_file", recording_save)
    merged = merge_adapter(base_dir, adapter, tmp_path / "merged", max_shard_size=limit)

    assert reads == Counter(dict.fromkeys(base_keys, 1)), "every tensor of the base read once, by the merge itself"
    assert peak["open"] == 1, "one checkpoint file open at a time"
    opened = [name for kind, name in events if kind == "open"]
    assert opened == checkpoint_files(base_dir)
    whole_model = sum(size for _, size in live)
    # Alive at once: the output shard being filled and one module being merged, not the model.
    assert peak["live_bytes"] <= limit + largest_module < whole_model / 4, (peak, whole_model)
    first_write = next(i for i, (kind, _) in enumerate(events) if kind == "write")
    last_open = max(i for i, (kind, _) in enumerate(events) if kind == "open")
    assert first_write < last_open, "output shards are written while the base is still being read"
    assert read_tensors(merged).keys() == base_keys


def test_an_adapter_on_a_tied_lm_head_is_refused(tiny_dirs, tmp_path):
    adapter = randomised_adapter(tiny_dirs["llama"], LoraConfig(r=2, target_modules=["q_proj", "lm_head"]),
                                 tmp_path / "adapter")
    with pytest.raises(MergeError, match=r"changes lm_head, whose weight .* shares with model\.embed_tokens\.weight"):
        merge_adapter(tiny_dirs["llama"], adapter, tmp_path / "merged")
    assert not [path for path in tmp_path.iterdir() if path.name != "adapter"]


def test_a_base_without_safetensors_weights_is_refused(tiny_dirs, tmp_path):
    base_dir = tmp_path / "no-weights"
    base_dir.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (base_dir / name).write_bytes((tiny_dirs["llama"] / name).read_bytes())
    settings = LoraSettings(r=2, alpha=4)
    family, parts = trained_parts(tiny_dirs["llama"], settings)
    adapter = export_parts_adapter(parts, tmp_path / "adapter", family, settings, "base")
    with pytest.raises(MergeError, match=re.escape(f"has no safetensors weights ({MODEL_WEIGHTS} or {MODEL_INDEX})")):
        merge_adapter(base_dir, adapter, tmp_path / "merged")
