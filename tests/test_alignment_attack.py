"""The alignment attack on a private Bottom (splitcore.privacy.alignment), on the tiny random Llama.

The trunk owner aligns the hidden states it receives from a private Bottom to the public
Bottom's output space without their tokens, then reads them with the public linear map.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import PROJECT_ROOT

from splitcore.data.examples import tokenize_examples
from splitcore.data.formats import TextExample, load_dataset_file
from splitcore.model.lora import LoraSettings, add_lora
from splitcore.model.part_loading import weight_sharing_copy
from splitcore.model.parts import split_model
from splitcore.privacy import attacks
from splitcore.privacy.alignment import AlignmentConfig, aligned_inversion, template_anchor_ids
from splitcore.privacy.client_secret import ClientSecret
from splitcore.privacy.private_bottom import randomise_lora
from splitcore.privacy.public_text import public_token_chunks
from splitcore.training.batches import collate

DEMO = PROJECT_ROOT / "webapp" / "demo" / "lighthouse_keeper.jsonl"
CANDIDATES = 8
# On the tiny model's one block, a change of 3x the weights hides the tokens from the public map
# (see test_privacy_audit); the secret is fixed so the test reads the same Bottom every run.
PRIVATE_SCALE = 3.0
SECRET = ClientSecret(b"a fixed key for the test's private Bottom")


class Scene:
    """The public Bottom and what the attacker prepared, a batch of the demo's chats, and a private Bottom."""

    def __init__(self, model, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.bottom = split_model(model, 1, 2)[0].eval()
        self.embeddings = self.bottom.backbone.get_submodule(self.bottom.family.embedding_attrs[0]).weight.detach()
        chunks = public_token_chunks(tokenizer, 2048, 64)
        self.public_hidden, self.public_ids = attacks.public_hidden_states(
            self.bottom, chunks, tokenizer.pad_token_id, 0.0, torch.Generator().manual_seed(0))
        self.inversion = attacks.fit_inversion(self.public_hidden, self.embeddings[self.public_ids])
        self.private = add_lora(weight_sharing_copy(self.bottom), self.bottom.family, LoraSettings(), seed=0)
        randomise_lora(self.private, SECRET, 0, PRIVATE_SCALE)
        self.private.eval()

    def batch(self, examples):
        batch = collate(tokenize_examples(self.tokenizer, examples, 64), self.tokenizer.pad_token_id)
        return batch.input_ids, batch.attention_mask

    @torch.no_grad()
    def received(self, bottom, ids, mask) -> torch.Tensor:
        return bottom(ids, mask)  # (batch, seq, hidden)

    def align(self, received, mask, config=AlignmentConfig()) -> attacks.TokenGuesses:
        return aligned_inversion(self.bottom, received, mask, self.public_hidden, self.public_ids, self.embeddings,
                                 self.inversion, CANDIDATES, config)

    def linear(self, received, mask) -> attacks.TokenGuesses:
        return attacks.learned_inversion(self.inversion, self.embeddings, received, mask, CANDIDATES)


def rate(guesses: attacks.TokenGuesses, ids, mask) -> float:
    read, total = attacks.recovery(guesses.tokens, ids, mask)
    return read / total


@pytest.fixture(scope="module")
def scene(load_model) -> Scene:
    return Scene(*load_model("llama"))


@pytest.fixture(scope="module")
def chats(scene):
    return scene.batch(load_dataset_file(DEMO).examples[:8])


def test_it_reads_more_of_a_private_bottom_than_the_public_linear_map(scene, chats):
    ids, mask = chats
    received = scene.received(scene.private, ids, mask)
    linear = rate(scene.linear(received, mask), ids, mask)
    aligned = rate(scene.align(received, mask), ids, mask)
    anchored = rate(scene.align(received, mask, AlignmentConfig(anchor_ids=template_anchor_ids(scene.tokenizer))),
                    ids, mask)
    assert linear < 0.3, "the private Bottom should hide most tokens from the public map"
    assert aligned > linear + 0.1, (linear, aligned)
    assert anchored >= aligned, (aligned, anchored)


def test_against_the_public_bottom_it_reads_what_the_candidate_search_reads(scene, chats):
    ids, mask = chats
    received = scene.received(scene.bottom, ids, mask)
    linear = scene.linear(received, mask)
    searched = attacks.exact_search(scene.bottom, received, mask, linear.candidates)
    aligned = scene.align(received, mask)
    assert torch.equal(aligned.tokens, searched.tokens)
    assert rate(aligned, ids, mask) >= rate(linear, ids, mask)


def test_it_is_deterministic_and_ranks_k_candidates(scene, chats):
    ids, mask = chats
    received = scene.received(scene.private, ids, mask)
    first, second = scene.align(received, mask), scene.align(received, mask)
    assert torch.equal(first.tokens, second.tokens)
    assert torch.equal(first.candidates, second.candidates)
    assert first.candidates.shape == (*ids.shape, CANDIDATES)
    assert not first.tokens[~mask.bool()].any(), "padding positions are not read"


def test_it_has_no_way_to_the_client_secret():
    parameters = list(inspect.signature(aligned_inversion).parameters)
    assert parameters == ["public_bottom", "received", "attention_mask", "public_hidden", "public_ids", "embeddings",
                          "inversion", "k", "config"]
    fields = set(AlignmentConfig.__dataclass_fields__)
    assert fields == {"shrinkage", "rounds", "ridge", "anchor_ids", "search", "seed"}


def test_the_template_anchors_are_the_chat_template_opening(scene):
    anchors = template_anchor_ids(scene.tokenizer)
    assert scene.tokenizer.decode(list(anchors)) == "<|im_start|>user\n"

    class NoTemplate:
        chat_template = None

    assert template_anchor_ids(NoTemplate()) == ()


def test_anchors_apply_only_where_every_example_shares_its_opening(scene):
    # Plain text: no opening shared by every example, so the template's tokens are not assumed there.
    ids, mask = scene.batch([TextExample(text=text) for text in (
        "The lamp burned all night.", "Boats came home at dawn.", "Fog rolled over the rocks again.")])
    received = scene.received(scene.private, ids, mask)
    anchored = scene.align(received, mask, AlignmentConfig(anchor_ids=template_anchor_ids(scene.tokenizer)))
    assert torch.equal(anchored.tokens, scene.align(received, mask).tokens)


@pytest.mark.parametrize("field, value, message", [
    ("shrinkage", 1.5, "shrinkage must be a number from 0 to 1"),
    ("rounds", -1, "number of rounds must be a whole number"),
    ("rounds", 2.0, "number of rounds must be a whole number"),
    ("ridge", -0.1, "ridge must be a number"),
    ("seed", -1, "seed must be a whole number"),
    ("anchor_ids", "<|im_start|>", "anchor_ids must be a sequence of token ids"),
    ("anchor_ids", (1, -2), "anchor_ids must be token ids"),
    ("search", "yes", "search must be true or false"),
])
def test_config_rejects_values_with_a_message(field, value, message):
    with pytest.raises(ValueError, match=message):
        AlignmentConfig(**{field: value})


def test_bad_shapes_are_refused_with_what_was_given(scene, chats):
    ids, mask = chats
    received = scene.received(scene.private, ids, mask)
    with pytest.raises(ValueError, match=r"received must be \(batch, seq, hidden\)"):
        scene.align(received[0], mask)
    with pytest.raises(ValueError, match="public_hidden must be"):
        aligned_inversion(scene.bottom, received, mask, scene.public_hidden[:, :3], scene.public_ids, scene.embeddings,
                          scene.inversion, CANDIDATES)
