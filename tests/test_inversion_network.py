"""The inversion network reads tokens from hidden states, and the extended public corpus is larger.

On the tiny random Llama (64-dimensional states, one block before the cut, blurred with hidden
noise 2 so that not every token is read): the network is fit on public text and read on other
public text it never saw, as the trunk owner would read a data owner's text. The extended
corpus is read from the docstrings of the installed packages.
"""

from __future__ import annotations

import dataclasses
import re
from itertools import islice

import pytest
import torch

from splitcore.model.parts import split_model
from splitcore.privacy import attacks
from splitcore.privacy.inversion_network import (
    InversionNetwork,
    InversionNetworkConfig,
    fit_inversion_network,
    network_inversion,
    public_hidden_grid,
)
from splitcore.privacy.public_text import (
    EXTENDED,
    REFERENCE,
    _file_paragraphs,
    corpus_paragraphs,
    docstring_paragraphs,
    documentation_files,
    public_paragraphs,
    public_token_chunks,
)

CHUNK = 64
PUBLIC_TOKENS = 3072
HELD_OUT_TOKENS = 1024
HIDDEN_NOISE = 2.0
FAST = InversionNetworkConfig(units=128, epochs=3, batch_size=256, negatives=256, seed=0)


@pytest.fixture(scope="module")
def tiny_llama(load_model):
    return load_model("llama")


@pytest.fixture(scope="module")
def public_states(tiny_llama):
    """(bottom, embeddings, training grid, held-out grid): the public Bottom's blurred states on two parts of the
    reference."""
    model, tokenizer = tiny_llama
    bottom, _, _ = split_model(model.eval(), 1, 2)
    chunks = public_token_chunks(tokenizer, PUBLIC_TOKENS + HELD_OUT_TOKENS, CHUNK)
    split = next(index for index in range(len(chunks)) if sum(map(len, chunks[:index])) >= PUBLIC_TOKENS)
    generator = torch.Generator().manual_seed(0)
    train = public_hidden_grid(bottom, chunks[:split], tokenizer.pad_token_id, HIDDEN_NOISE, generator)
    held_out = public_hidden_grid(bottom, chunks[split:], tokenizer.pad_token_id, HIDDEN_NOISE, generator)
    embeddings = bottom.backbone.get_submodule(bottom.family.embedding_attrs[0]).weight.detach()
    return bottom, embeddings, train, held_out


@pytest.fixture(scope="module")
def network(public_states):
    _, embeddings, train, _ = public_states
    return fit_inversion_network(*train, embeddings, FAST)


def test_the_grid_holds_the_states_public_hidden_states_returns(tiny_llama, public_states):
    _, tokenizer = tiny_llama
    bottom = public_states[0]
    chunks = public_token_chunks(tokenizer, 512, CHUNK)
    hidden, mask, ids = public_hidden_grid(bottom, chunks, tokenizer.pad_token_id, 0.5,
                                           torch.Generator().manual_seed(3))
    flat, flat_ids = attacks.public_hidden_states(bottom, chunks, tokenizer.pad_token_id, 0.5,
                                                  torch.Generator().manual_seed(3))
    assert hidden.shape == (len(chunks), max(map(len, chunks)), bottom.config.hidden_size)
    assert mask.sum(1).tolist() == [len(chunk) for chunk in chunks]
    assert torch.equal(hidden[mask.bool()], flat) and torch.equal(ids[mask.bool()], flat_ids)
    assert not hidden[~mask.bool()].any()


def test_the_network_reads_held_out_public_text_far_above_chance_and_as_the_linear_map_does(public_states, network):
    _, embeddings, (train_hidden, train_mask, train_ids), (hidden, mask, ids) = public_states
    guesses = network_inversion(network, embeddings, hidden, mask, k=4)
    read, total = attacks.recovery(guesses.tokens, ids, mask)
    chance = 1 / embeddings.shape[0]
    assert total == int(mask.sum()) > 500
    assert read / total > 0.4 > 100 * chance, f"read {read} of {total}"
    real = train_mask.bool()
    linear_map = attacks.fit_inversion(train_hidden[real], embeddings[train_ids[real]])
    linear_read, _ = attacks.recovery(attacks.learned_inversion(linear_map, embeddings, hidden, mask, 1).tokens, ids,
                                      mask)
    assert read >= linear_read - 0.03 * total, f"network {read}, linear map {linear_read} of {total}"
    assert guesses.candidates.shape == (*ids.shape, 4)
    assert torch.equal(guesses.candidates[..., 0], guesses.tokens)
    assert not guesses.candidates[~mask.bool()].any(), "padding gets no guesses"
    in_top_four = guesses.candidates.eq(ids[..., None]).any(-1) & mask.bool()
    assert int(in_top_four.sum()) >= read


def test_a_window_holds_the_neighbours_states_and_whether_they_are_there():
    network = InversionNetwork(InversionNetworkConfig(before=1, after=1), hidden_size=2, embed_size=3)
    hidden = torch.arange(1.0, 13.0).view(2, 3, 2)  # (batch 2, seq 3, hidden 2)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    windows = network.windows(hidden, mask)  # mean 0, scale 1: the states themselves
    assert windows.shape == (5, 3 * 2 + 3)
    assert windows[0].tolist() == [0, 0, 1, 2, 3, 4, 0, 1, 1]  # first position: nothing before it
    assert windows[1].tolist() == [1, 2, 3, 4, 5, 6, 1, 1, 1]
    assert windows[4].tolist() == [7, 8, 9, 10, 0, 0, 1, 1, 0]  # the padding after the end is not there


def test_the_network_is_deterministic_for_a_seed(public_states, network):
    _, embeddings, train, _ = public_states
    again = fit_inversion_network(*train, embeddings, FAST)
    other = fit_inversion_network(*train, embeddings, dataclasses.replace(FAST, seed=1))
    state, same, different = network.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(state[name], same[name]) for name in state)
    assert not all(torch.equal(state[name], different[name]) for name in state)


@pytest.mark.parametrize("field, value, message", [
    ("before", -1, "positions before the token"), ("after", 17, "positions after the token"),
    ("units", 0, "hidden units"), ("layers", 5, "hidden layers"), ("epochs", 1.5, "epochs"),
    ("batch_size", True, "batch size"), ("learning_rate", 0, "learning rate"),
    ("weight_decay", 2, "weight decay"), ("negatives", -1, "sampled negatives"),
    ("logit_scale", float("nan"), "logit scale"),
    ("ridge", "1", "ridge penalty"), ("seed", -1, "seed"),
])
def test_the_config_rejects_values_with_a_message(field, value, message):
    with pytest.raises(ValueError, match=message):
        InversionNetworkConfig(**{field: value})


def test_bad_inputs_are_refused_with_what_was_wrong(public_states, network):
    _, embeddings, (hidden, mask, ids), _ = public_states
    with pytest.raises(ValueError, match=r"public_hidden must be \(n_chunks, seq, hidden\)"):
        fit_inversion_network(hidden[mask.bool()], mask, ids, embeddings, FAST)
    with pytest.raises(ValueError, match="public_mask .* must be"):
        fit_inversion_network(hidden, mask[:, :-1], ids, embeddings, FAST)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fit_inversion_network(hidden, mask, ids + embeddings.shape[0], embeddings, FAST)
    with pytest.raises(ValueError, match="config must be an InversionNetworkConfig"):
        fit_inversion_network(hidden, mask, ids, embeddings, {"epochs": 1})
    with pytest.raises(ValueError, match="hidden states of size 64"):
        network_inversion(network, embeddings, hidden[..., :32], mask, 4)
    with pytest.raises(ValueError, match="k"):
        network_inversion(network, embeddings, hidden, mask, 0)


def test_docstring_paragraphs_keep_prose_and_drop_code():
    docstring = ("Return the frobnicated value of the given widget, rounded down.\n\n"
                 ">>> frobnicate(widget)\n42\n\n"
                 "Use it like this::\n\n    value = frobnicate(widget, strict=True)\n    print(value)\n\n"
                 ":param widget: the widget\n\n"
                 "The widget must be\nattached to a window first.")
    assert docstring_paragraphs(docstring) == [
        "Return the frobnicated value of the given widget, rounded down.",
        "The widget must be attached to a window first.",
    ]


def test_the_extended_corpus_is_deterministic_and_larger_than_the_reference(tiny_llama):
    _, tokenizer = tiny_llama
    reference_chunks = public_token_chunks(tokenizer, 4000, CHUNK, corpus=REFERENCE)
    assert reference_chunks == public_token_chunks(tokenizer, 4000, CHUNK)  # the default is the reference
    with pytest.raises(ValueError, match=r"the reference public text holds only (\d+) tokens") as refused:
        public_token_chunks(tokenizer, 10**9, CHUNK)
    reference_capacity = int(re.search(r"holds only (\d+)", str(refused.value)).group(1))
    larger = public_token_chunks(tokenizer, reference_capacity + 1, CHUNK, corpus=EXTENDED)
    assert sum(map(len, larger)) > reference_capacity

    first = list(islice(corpus_paragraphs(EXTENDED), 3))
    assert first[:2] == list(public_paragraphs()[:2]) and first[2] not in public_paragraphs()
    chunks = public_token_chunks(tokenizer, 4000, CHUNK, corpus=EXTENDED)
    assert 4000 <= sum(map(len, chunks)) < 4000 + CHUNK and max(map(len, chunks)) <= CHUNK
    assert chunks[0] == reference_chunks[0] and chunks[1] != reference_chunks[1]
    documentation_files.cache_clear()  # read the files afresh: the same files in the same order give the same text
    _file_paragraphs.cache_clear()
    assert public_token_chunks(tokenizer, 4000, CHUNK, corpus=EXTENDED) == chunks


def test_an_unknown_corpus_is_refused(tiny_llama):
    _, tokenizer = tiny_llama
    with pytest.raises(ValueError, match="unknown public corpus 'wiki'; choose one of reference, extended"):
        public_token_chunks(tokenizer, 100, CHUNK, corpus="wiki")


def test_fitting_leaves_the_global_random_generator_alone(public_states):
    _, embeddings, train, _ = public_states
    before = torch.random.get_rng_state()
    fit_inversion_network(*train, embeddings, dataclasses.replace(FAST, epochs=0))
    assert torch.equal(torch.random.get_rng_state(), before)
