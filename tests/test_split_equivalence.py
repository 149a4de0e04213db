"""Cutting a model into Bottom / Trunk / Top changes nothing numerically."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, SENTENCES, tokenize
from split_helpers import full_forward, run_split
from transformers import DynamicCache

from splitcore import split_model
from splitcore.model.tiny_models import TINY_ARCHS

TOLERANCE = 1e-5
# Gemma 2 has no SDPA path in transformers (its attention is soft-capped): eager only.
EAGER_ONLY = {"gemma2"}
ARCH_ATTN = [(arch, attn) for arch in ARCHS for attn in ("eager", "sdpa") if attn == "eager" or arch not in EAGER_ONLY]


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("arch,attn", ARCH_ATTN)
def test_split_logits_equal_full_logits(load_model, arch, attn, padding_side):
    model, tokenizer = load_model(arch, attn)
    model.eval()
    input_ids, attention_mask, labels = tokenize(tokenizer, padding_side)
    assert (attention_mask == 0).any(), "the batch must contain padding"
    with torch.no_grad():
        full = full_forward(model, input_ids, attention_mask, labels)
        split = run_split(split_model(model, 2, 2), input_ids, attention_mask, labels)
    diff = (split.logits - full.logits).abs().max().item()
    assert diff <= TOLERANCE, f"{arch}/{attn}/{padding_side}: max abs logit diff {diff}"
    assert abs(split.loss.item() - full.loss.item()) <= TOLERANCE


@pytest.mark.parametrize("n_bottom,n_top", [(1, 1), (1, 4), (4, 1), (3, 2)])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_cut_point_gives_the_same_logits(load_model, arch, n_bottom, n_top):
    model, tokenizer = load_model(arch)
    model.eval()
    input_ids, attention_mask, _ = tokenize(tokenizer)
    with torch.no_grad():
        full = full_forward(model, input_ids, attention_mask).logits
        split = run_split(split_model(model, n_bottom, n_top), input_ids, attention_mask).logits
    assert (split - full).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_positions_come_from_the_mask(load_model, arch):
    """A left-padded row gives the same logits as the same text without padding."""
    model, tokenizer = load_model(arch)
    model.eval()
    parts = split_model(model, 2, 2)
    input_ids, attention_mask, _ = tokenize(tokenizer, "left")
    short = tokenizer([SENTENCES[0]], return_tensors="pt")
    with torch.no_grad():
        padded = run_split(parts, input_ids, attention_mask).logits[0]
        alone = run_split(parts, short.input_ids, short.attention_mask).logits[0]
    real = attention_mask[0].bool()
    assert int(real.sum()) == short.input_ids.shape[1]
    assert (padded[real] - alone).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_decoding_with_a_cache_per_part(load_model, arch):
    """Each part keeps its own KV cache; one token at a time equals the full forward."""
    model, tokenizer = load_model(arch)
    model.eval()
    input_ids, attention_mask, _ = tokenize(tokenizer, "left")
    bottom, trunk, top = split_model(model, 2, 2)
    caches = [DynamicCache(config=model.config) for _ in range(3)]
    prefill = 4
    steps = []
    with torch.no_grad():
        full = full_forward(model, input_ids, attention_mask).logits
        for start, end in [(0, prefill)] + [(i, i + 1) for i in range(prefill, input_ids.shape[1])]:
            mask = attention_mask[:, :end]
            hidden = bottom(input_ids[:, start:end], mask, past_key_values=caches[0], use_cache=True)
            hidden = trunk(hidden, mask, past_key_values=caches[1], use_cache=True)
            steps.append(top(hidden, mask, past_key_values=caches[2], use_cache=True).logits)
    incremental = torch.cat(steps, dim=1)
    real = attention_mask.bool()
    assert (incremental - full)[real].abs().max().item() <= TOLERANCE


def test_parts_keep_the_full_model_module_paths(load_model):
    model, _ = load_model("llama")
    full_names = dict(model.named_parameters(remove_duplicate=False))
    bottom, trunk, top = split_model(model, 2, 1)
    for part, layers in ((bottom, {0, 1}), (trunk, {2, 3, 4}), (top, {5})):
        names = dict(part.named_parameters(remove_duplicate=False))
        for name, param in names.items():
            assert full_names[name] is param, name
        owned = {int(name.split(".")[2]) for name in names if name.startswith("model.layers.")}
        assert owned == layers
    assert "model.embed_tokens.weight" in dict(bottom.named_parameters())
    assert "model.norm.weight" in dict(top.named_parameters())
    assert not any(n.startswith("model.embed_tokens") for n, _ in trunk.named_parameters())
