"""Every invalid split raises ValueError naming the limit or the supported families."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, BertConfig, BertLMHeadModel, LlamaConfig

from splitcore import SplitSpec, split_model


@pytest.mark.parametrize(
    "n_bottom,n_top,message",
    [
        (0, 2, r"n_bottom must be at least 1 \(got 0\)"),
        (2, 0, r"n_top must be at least 1 \(got 0\)"),
        (-1, 2, r"n_bottom must be at least 1 \(got -1\)"),
        (3, 3, r"n_bottom \+ n_top = 3 \+ 3 = 6 leaves no layer for the Trunk: the model has 6 decoder layers, "
               r"so n_bottom \+ n_top must be at most 5"),
        (5, 2, r"must be at most 5"),
        (10, 1, r"must be at most 5"),
        (2.0, 1, r"n_bottom must be an integer, got 2.0"),
        (True, 1, r"n_bottom must be an integer, got True"),
    ],
)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_invalid_layer_counts(load_model, arch, n_bottom, n_top, message):
    model, _ = load_model(arch)
    with pytest.raises(ValueError, match=message):
        split_model(model, n_bottom, n_top)


def test_the_largest_valid_split_works(load_model):
    model, _ = load_model("llama")
    bottom, trunk, top = split_model(model, 4, 1)
    assert (bottom.layer_indices, trunk.layer_indices, top.layer_indices) == ((0, 1, 2, 3), (4,), (5,))


def test_a_model_too_shallow_to_split():
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         vocab_size=300)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="the model has 2 decoder layers; splitting .* needs at least 3"):
        split_model(model, 1, 1)


def test_unsupported_architecture_names_the_supported_families():
    model = BertLMHeadModel(BertConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64,
                                       num_attention_heads=2, vocab_size=300, is_decoder=True))
    with pytest.raises(ValueError) as error:
        split_model(model, 1, 1)
    text = str(error.value)
    assert "unsupported architecture 'bert'" in text
    assert "gpt2 (gpt2)" in text and "llama (llama, mistral, qwen2)" in text


def test_not_a_hugging_face_model():
    import torch

    with pytest.raises(ValueError, match="expected a Hugging Face \\*ForCausalLM model, got Linear"):
        split_model(torch.nn.Linear(2, 2), 1, 1)


def test_split_spec_ranges():
    spec = SplitSpec(num_layers=30, n_bottom=2, n_top=3)
    assert spec.bottom_layers == range(0, 2)
    assert spec.trunk_layers == range(2, 27)
    assert spec.top_layers == range(27, 30)
