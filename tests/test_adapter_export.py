"""The three parts' LoRA weights export as one ordinary PEFT adapter for the unsplit model."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import tokenize
from lora_helpers import trained_parts
from peft import PeftModel
from safetensors import safe_open
from split_helpers import run_split
from transformers import AutoModelForCausalLM, AutoTokenizer

from splitcore import LoraSettings, export_adapter, export_parts_adapter, positions_from_mask
from splitcore.model.adapter_export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, merge_adapter_states, part_adapter_state
from splitcore.model.tiny_models import TINY_ARCHS


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("settings", [LoraSettings(r=4, alpha=8), LoraSettings(r=4, alpha=8, use_dora=True)],
                         ids=["lora", "dora"])
def test_exported_adapter_loads_on_the_unsplit_model_with_the_same_logits(tiny_dirs, tmp_path, arch, settings):
    model_dir = tiny_dirs[arch]
    family, parts = trained_parts(model_dir, settings)
    out = export_parts_adapter(parts, tmp_path / "adapter", family, settings, str(model_dir))

    with safe_open(str(out / ADAPTER_WEIGHTS), framework="pt") as weights:
        keys = set(weights.keys())
        b_weights = [weights.get_tensor(k) for k in keys if ".lora_B." in k]
    assert b_weights and all(torch.count_nonzero(b) > 0 for b in b_weights)
    layers = {int(re.search(r"\.(?:h|layers)\.(\d+)\.", k).group(1)) for k in keys}
    assert layers == set(range(6)), "every part's layers are in the one adapter"

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    input_ids, attention_mask, _ = tokenize(tokenizer, "left")
    position_ids = positions_from_mask(attention_mask, input_ids.shape[1])
    with torch.no_grad():
        expected = run_split(parts, input_ids, attention_mask).logits
        got = loaded(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        base = AutoModelForCausalLM.from_pretrained(model_dir)(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    assert (got - expected).abs().max().item() <= 1e-5
    assert (got - base).abs().max().item() > 1e-3, "the adapter must change the model"


def test_adapter_directory_is_standard_peft(tiny_dirs, tmp_path):
    settings = LoraSettings(r=4, alpha=8, dropout=0.1, use_rslora=True)
    family, parts = trained_parts(tiny_dirs["llama"], settings)
    out = export_parts_adapter(parts, tmp_path / "adapter", family, settings, "my-org/base-model")
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA"
    assert config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == "my-org/base-model"
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["lora_dropout"] == 0.1
    assert config["use_rslora"] is True and config["use_dora"] is False
    assert sorted(config["target_modules"]) == sorted(family.lora_targets)
    with safe_open(str(out / ADAPTER_WEIGHTS), framework="pt") as weights:
        assert weights.metadata() == {"format": "pt"}
        keys = list(weights.keys())
    # The key layout inference servers expect for a PEFT LoRA adapter on a Llama model.
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.5.mlp.down_proj.lora_B.weight" in keys
    assert all(k.startswith("base_model.model.model.layers.") for k in keys)
    assert len(keys) == 6 * 7 * 2


def test_export_from_states_matches_export_from_parts(tiny_dirs, tmp_path):
    """The trunk's weights arrive as a state dict from the server; exporting states is the same."""
    settings = LoraSettings(r=2, alpha=4)
    family, parts = trained_parts(tiny_dirs["gpt2"], settings)
    a = export_parts_adapter(parts, tmp_path / "a", family, settings, "base")
    b = export_adapter([part_adapter_state(p) for p in parts], tmp_path / "b", family, settings, "base")
    assert (a / ADAPTER_CONFIG).read_text() == (b / ADAPTER_CONFIG).read_text()
    with safe_open(str(a / ADAPTER_WEIGHTS), "pt") as wa, safe_open(str(b / ADAPTER_WEIGHTS), "pt") as wb:
        assert set(wa.keys()) == set(wb.keys())
        assert all(torch.equal(wa.get_tensor(k), wb.get_tensor(k)) for k in wa.keys())


def test_overlapping_or_empty_states_are_refused():
    weight = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="two parts hold the same adapter weight: k"):
        merge_adapter_states([{"k": weight}, {"k": weight}])
    with pytest.raises(ValueError, match="no LoRA weights to export"):
        merge_adapter_states([{}, {}])
