"""LoRA on the parts comes from peft and trains exactly like monolithic PEFT."""

from __future__ import annotations

import pytest
import torch
from conftest import tokenize
from lora_helpers import canonical, randomise_lora_b
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from split_helpers import split_backward

from splitcore import LoraSettings, add_lora, family_for, init_lora_weights, split_model
from splitcore.model.tiny_models import TINY_ARCHS

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
# Every tiny family with plain LoRA, plus the variants on the two oldest and a Qwen2 with sliding layers.
GRADIENT_CASES = {
    **{arch: (arch, LORA) for arch in TINY_ARCHS},
    "gpt2-dora": ("gpt2", LoraSettings(r=4, alpha=8, dropout=0.0, use_dora=True)),
    "llama-dora": ("llama", LoraSettings(r=4, alpha=8, dropout=0.0, use_dora=True)),
    "llama-rslora": ("llama", LoraSettings(r=8, alpha=4, dropout=0.0, use_rslora=True)),
    "qwen2": ("qwen2", LORA),
}
# GPT-2's Conv1D projections have their own test below.
LINEAR_ARCHS = [arch for arch in TINY_ARCHS if arch != "gpt2"]


def copy_lora_b(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(values[canonical(name)])


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {canonical(n): p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch,settings", list(GRADIENT_CASES.values()), ids=list(GRADIENT_CASES))
def test_split_lora_gradients_equal_monolithic_peft(load_model, arch, settings):
    model, tokenizer = load_model(arch)
    family = family_for(model.config)
    input_ids, attention_mask, labels = tokenize(tokenizer, "right")

    mono = get_peft_model(model, settings.peft_config(family, task_type="CAUSAL_LM"))
    init_lora_weights(mono, seed=7)
    b_values = randomise_lora_b(mono)
    mono_loss = mono(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    mono_loss.backward()
    expected = lora_grads(mono)

    split_source, _ = load_model(arch)
    peft_parts = [add_lora(part, family, settings, seed=7) for part in split_model(split_source, 2, 2)]
    for part in peft_parts:
        copy_lora_b(part, b_values)
    split_loss = split_backward(peft_parts, input_ids, attention_mask, labels)
    got = {}
    for part in peft_parts:
        got.update(lora_grads(part))

    assert got.keys() == expected.keys()
    assert any(".lora_A." in k for k in got) and any(".lora_B." in k for k in got)
    if settings.use_dora:
        assert any("lora_magnitude_vector" in k for k in got)
    assert abs(split_loss.item() - mono_loss.item()) <= 1e-6
    for key in expected:
        assert expected[key].abs().max() > 0, f"{key} got no gradient"
        diff = (got[key] - expected[key]).abs().max().item()
        scale = expected[key].abs().max().item()
        assert diff <= 1e-5 * max(1.0, scale), f"{key}: gradient differs by {diff}"


@pytest.mark.parametrize("arch", LINEAR_ARCHS)
def test_parts_are_peft_models_with_only_lora_trainable(load_model, arch):
    model, _ = load_model(arch)
    family = family_for(model.config)
    settings = LoraSettings(r=2, alpha=4, dropout=0.1)
    peft_parts = [add_lora(part, family, settings) for part in split_model(model, 2, 2)]
    for part in peft_parts:
        assert isinstance(part, PeftModel)
        trainable = [n for n, p in part.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_" in n for n in trainable)
        layers = [m for m in part.modules() if isinstance(m, LoraLayer)]
        assert {type(m.base_layer).__name__ for m in layers} == {"Linear"}
        assert all(m.r["default"] == 2 and m.scaling["default"] == 2.0 for m in layers)
    # Every projection of every decoder layer is adapted (seven, or four fused ones in Phi-3), and nothing else.
    adapted = {n.split(".lora_A")[0] for p in peft_parts for n, _ in p.named_parameters() if ".lora_A." in n}
    assert len(adapted) == 6 * len(family.lora_targets)
    assert {a.rsplit(".", 1)[-1] for a in adapted} == set(family.lora_targets)


def test_gpt2_defaults_adapt_attention_and_mlp_conv1d(load_model):
    model, _ = load_model("gpt2")
    family = family_for(model.config)
    part = add_lora(split_model(model, 2, 2)[1], family, LoraSettings())
    adapted = {n.split(".lora_A")[0].split(".", 5)[-1] for n, _ in part.named_parameters() if ".lora_A." in n}
    assert adapted == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    assert part.peft_config["default"].fan_in_fan_out is True


def test_rslora_and_dora_are_peft_flags(load_model):
    model, _ = load_model("llama")
    family = family_for(model.config)
    part = add_lora(split_model(model, 2, 2)[1], family, LoraSettings(r=16, alpha=8, use_rslora=True, use_dora=True))
    layer = next(m for m in part.modules() if isinstance(m, LoraLayer))
    assert layer.scaling["default"] == pytest.approx(8 / 16**0.5)
    assert "default" in layer.lora_magnitude_vector


def test_custom_targets_skip_parts_without_them(load_model):
    model, _ = load_model("llama")
    family = family_for(model.config)
    settings = LoraSettings(target_modules=("q_proj", "lm_head"))
    bottom, trunk, top = (add_lora(p, family, settings) for p in split_model(model, 2, 2))
    assert set(bottom.peft_config["default"].target_modules) == {"q_proj"}
    assert set(top.peft_config["default"].target_modules) == {"q_proj", "lm_head"}
    trunk = split_model(load_model("llama")[0], 2, 2)[1]
    with pytest.raises(ValueError, match="none of the LoRA target modules lm_head exist in Trunk"):
        add_lora(trunk, family, LoraSettings(target_modules=("lm_head",)))


def test_initialisation_is_deterministic_per_module_path(load_model):
    family = family_for(load_model("llama")[0].config)
    settings = LoraSettings()

    def a_matrices(seed):
        parts = [add_lora(p, family, settings, seed=seed) for p in split_model(load_model("llama")[0], 2, 2)]
        return {canonical(n): p.detach().clone() for part in parts for n, p in part.named_parameters()
                if ".lora_A." in n or ".lora_B." in n}

    first, again, other = a_matrices(3), a_matrices(3), a_matrices(4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert all(torch.count_nonzero(v) == 0 for k, v in first.items() if ".lora_B." in k)
    assert any(not torch.equal(first[k], other[k]) for k in first if ".lora_A." in k)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(r=0), "rank r must be an integer between 1 and 4096"),
        (dict(r=2.5), "rank r must be an integer"),
        (dict(alpha=0), "alpha must be a positive number"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
        (dict(target_modules=("q_proj", "layers.*")), "is not a module name"),
    ],
)
def test_invalid_lora_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraSettings(**kwargs)
