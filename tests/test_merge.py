"""An exported adapter merges into its base model: an ordinary model directory with the adapted logits."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from conftest import tokenize
from peft import IA3Config, LoHaConfig, LoKrConfig, PeftModel, PromptTuningConfig, get_peft_model
from safetensors import safe_open
from test_adapter_export import trained_parts
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from splitcore import LoraSettings, export_parts_adapter
from splitcore.model.merge import MODEL_WEIGHTS, MergeError, merge_adapter


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
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
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
