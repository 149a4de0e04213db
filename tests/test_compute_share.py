"""The compute each side of a cut pays: counted from a model's config, checked against the real models."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, Gemma3TextConfig

from splitcore.model.architectures import FAMILIES, family_for
from splitcore.model.compute_share import (
    DEFAULT_CONTEXT,
    SHAPE_READERS,
    attended_keys,
    compute_share,
    model_compute,
)
from splitcore.model.tiny_models import TINY_ARCHS, TINY_SLIDING_WINDOW, TinyModelSpec, build_tokenizer, tiny_config

from conftest import PROJECT_ROOT

DEFAULT_CONFIG = json.loads((PROJECT_ROOT / "benchmarks" / "default_model_config.json").read_text())


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_the_default_model_s_client_share_at_the_cuts_the_form_offers():
    two_two = compute_share(DEFAULT_CONFIG, 2, 2)
    deep = compute_share(DEFAULT_CONFIG, 8, 16)
    assert (two_two.client_blocks, two_two.trunk_blocks, two_two.total_blocks) == (4, 26, 30)
    assert two_two.client_share == pytest.approx(0.310, abs=0.002)
    assert deep.client_share == pytest.approx(0.841, abs=0.002)
    assert two_two.describe() == ("your workers run 4 of 30 blocks and the LM head (31% of a step's compute); "
                                  "the trunk runs 26")
    assert deep.to_dict() == {"client_blocks": 24, "trunk_blocks": 6, "total_blocks": 30,
                              "client_share": deep.client_share, "description": deep.describe()}
    # The projections alone (one token of context): the LM head is 21% of a step, the cuts 32% and 84%.
    projections = model_compute(DEFAULT_CONFIG, context=1)
    assert projections.head_macs / (sum(projections.block_macs) + projections.head_macs) == pytest.approx(0.2105,
                                                                                                         abs=1e-3)
    assert projections.share(2, 2).percent == "32%" and projections.share(8, 16).percent == "84%"


def test_every_registered_family_has_a_compute_count():
    assert {family.name for family in FAMILIES} <= set(SHAPE_READERS)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_the_count_equals_the_real_model_s_matmuls(arch, tokenizer):
    """Every projection and the LM head, as torch counts them in a forward of the real model: eager attention
    computes all context × context scores before masking, so at one token of context the count is exact."""
    config = tiny_config(TinyModelSpec(arch=arch), tokenizer)
    assert_counted_matmuls_equal_torch_s(config)


def test_a_head_width_other_than_hidden_over_heads_is_counted(tokenizer):
    """Gemma's queries are heads × head_dim wide, not hidden wide."""
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=32)
    assert_counted_matmuls_equal_torch_s(config)


def assert_counted_matmuls_equal_torch_s(config, seq: int = 7) -> None:
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.arange(seq).unsqueeze(0) + 10)  # (1, seq)
    per_token = model_compute(config, context=1)  # projections + scores over one key
    shape = SHAPE_READERS[family_for(config).name](config)
    # Eager attention multiplies every query with all ``seq`` keys: add the scores beyond the first key.
    extra_scores = shape.score_macs(seq - 1) * per_token.total_blocks
    counted_macs = seq * (sum(per_token.block_macs) + per_token.head_macs + extra_scores)
    assert counter.get_total_flops() == 2 * counted_macs


def test_causal_and_sliding_window_scores_count_the_keys_each_token_sees():
    for context, window in ((10, None), (10, 4), (10, 10), (10, 20), (1, 3)):
        seen = [min(i, window or i) for i in range(1, context + 1)]
        assert attended_keys(context, window) == pytest.approx(sum(seen) / context)


def test_sliding_layers_cost_less_than_full_ones_past_the_window(tokenizer):
    config = tiny_config(TinyModelSpec(arch="qwen3"), tokenizer)  # sliding and full layers by turns
    compute = model_compute(config, context=4 * TINY_SLIDING_WINDOW)
    sliding, full = compute.block_macs[0], compute.block_macs[1]
    assert config.layer_types[:2] == ["sliding_attention", "full_attention"]
    assert sliding < full and compute.block_macs[2] == sliding and compute.block_macs[3] == full
    within_window = model_compute(config, context=TINY_SLIDING_WINDOW)
    assert len(set(within_window.block_macs)) == 1


def test_a_config_json_dict_counts_as_its_config_object(tokenizer):
    config = tiny_config(TinyModelSpec(arch="gpt2"), tokenizer)
    assert model_compute(config.to_dict()) == model_compute(config)
    assert model_compute(config).context == DEFAULT_CONTEXT


@pytest.mark.parametrize(("config", "cut", "context", "message"), [
    (DEFAULT_CONFIG, (20, 10), DEFAULT_CONTEXT, "leaves no layer for the Trunk"),
    (DEFAULT_CONFIG, (0, 2), DEFAULT_CONTEXT, "n_bottom must be at least 1"),
    (DEFAULT_CONFIG, (2, 2), 0, "context must be a positive number of tokens"),
    ({**DEFAULT_CONFIG, "model_type": "bert"}, (2, 2), DEFAULT_CONTEXT, "unsupported architecture 'bert'"),
    ({"hidden_size": 8}, (2, 2), DEFAULT_CONTEXT, "no model_type"),
    ("config.json", (2, 2), DEFAULT_CONTEXT, "expected a transformers config or a config.json dict"),
])
def test_bad_input_is_refused_with_what_was_wrong(config, cut, context, message):
    with pytest.raises(ValueError, match=message):
        compute_share(config, *cut, context=context)
