"""An attack on a private Bottom that aligns the received hidden states to the public Bottom's.

The linear map and the candidate search of ``attacks`` assume the client runs the public
Bottom. A private Bottom (``private_bottom``) breaks that assumption, but the trunk owner
receives many hidden states of the private Bottom and can fit a map from them to the public
Bottom's output space without knowing their tokens. ``aligned_inversion`` plays that attacker.
It uses only what the trunk owner has: the received states and mask, the public Bottom and
embeddings, its own public text's states, and (optionally) the tokens the public chat template
puts at the start of every example.

How it aligns (all in closed form, no gradient steps):

1. **Moment matching** (CORAL): the received states are whitened with their own covariance
   and re-coloured with the public states' covariance, means matched. Both covariances are
   shrunk towards a multiple of the identity (the sample is small).
2. **Anchors**: positions whose received states are the same in every example (up to the
   noise) hold the same token in every example; with ``anchor_ids`` (the chat template's
   opening, ``template_anchor_ids``), those leading positions are read as the template's
   tokens, and their public-Bottom states are known exactly.
3. **Self-training**: the map in whitened coordinates (identity after step 1) is refit a few
   rounds from the received states to the public Bottom's states of the current reading
   (the public Bottom run on the guessed tokens), anchors included, with a ridge penalty that
   keeps it near the moment-matched map; each round reads the tokens again through the public
   linear map.
4. **Candidate search in the aligned space**: left to right, each position's best candidates
   are run through the public Bottom after the prefix read so far, and the one nearest the
   aligned received state (in whitened coordinates) wins.

The received states are also read as the public Bottom's own (the public linear map, then
``attacks.exact_search``). That reading is kept when the public Bottom's states of the tokens
it read leave less than all of the received states' variance unexplained, and less than the
aligned reading leaves of the aligned states': with no private Bottom (or a small one) the
public Bottom explains them and the attack reads what the audit's candidate search reads.

Measured on the default model (SmolLM2-135M-Instruct), the demo chats, a 2 + 2 cut, 8
examples (512 tokens, the first 24 of each the chat template's opening), one client secret
per setting, the aligned states read through the public map (the final search moved it by
about a point either way): at private Bottom 1 the public linear map read 10% of the tokens,
the alignment 39% without anchors and 56% with the template's (29% of the tokens after the
template); at 2, 2% against 2% without anchors and 42% with them, nearly all of it the
template (8% after it). It costs one candidate search and a few Bottom passes over the
sample, about as much again as the audit's own search.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from splitcore.model.parts import Bottom
from splitcore.privacy import attacks

# Leading positions whose received states differ across examples by less than this share of the
# distance between different positions hold the same token in every example.
SHARED_PREFIX_RATIO = 0.8


def _check_number(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"the alignment attack's {name} must be a number from {low:g} to {high:g}, got {value!r}")


def _check_whole(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"the alignment attack's {name} must be a whole number from {low} to {high}, got {value!r}")


@dataclass(frozen=True)
class AlignmentConfig:
    """Knobs of the alignment attack.

    ``shrinkage``: how far each covariance is pulled towards a multiple of the identity before
    whitening (0: none, 1: only per-position scale is matched). ``rounds``: self-training rounds.
    ``ridge``: penalty keeping the whitened map near the moment-matched one, relative to the
    number of positions it is fit on. ``anchor_ids``: the tokens the attacker expects at the
    start of every example (``template_anchor_ids``); empty: no anchors. ``search``: finish
    with the candidate search in the aligned space. ``seed``: the attacker's own random draws
    (the attack draws none at present; kept so runs stay reproducible if it does).
    """

    shrinkage: float = 0.5
    rounds: int = 3
    ridge: float = 1.0
    anchor_ids: tuple[int, ...] = ()
    search: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _check_number("shrinkage", self.shrinkage, 0.0, 1.0)
        _check_whole("number of rounds", self.rounds, 0, 50)
        _check_number("ridge", self.ridge, 0.0, 1e6)
        _check_whole("seed", self.seed, 0, 2**63 - 1)
        if isinstance(self.anchor_ids, (str, bytes)) or not isinstance(self.anchor_ids, Sequence):
            raise ValueError(f"the alignment attack's anchor_ids must be a sequence of token ids, "
                             f"got {self.anchor_ids!r}")
        anchors = tuple(self.anchor_ids)
        for token in anchors:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ValueError(f"the alignment attack's anchor_ids must be token ids (whole numbers from 0), "
                                 f"got {token!r}")
        object.__setattr__(self, "anchor_ids", anchors)
        if not isinstance(self.search, bool):
            raise ValueError(f"the alignment attack's search must be true or false, got {self.search!r}")


def template_anchor_ids(tokenizer) -> tuple[int, ...]:
    """The tokens the tokenizer's chat template puts before the first user message of every chat.

    Two different one-message chats are rendered; their common leading tokens are the template's
    own (e.g. the default system prompt). Empty when the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        return ()
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True)
                for text in ("a", "zebra crossing")]
    rendered = [list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids) for ids in rendered]
    shared = 0
    for first, second in zip(*rendered):
        if first != second:
            break
        shared += 1
    return tuple(int(token) for token in rendered[0][:shared])


@dataclass(frozen=True)
class _Whitening:
    """x -> (x - mean) @ inverse_root whitens; y @ root + mean colours back. float64."""

    mean: torch.Tensor  # (hidden,)
    inverse_root: torch.Tensor  # (hidden, hidden)
    root: torch.Tensor  # (hidden, hidden)

    @classmethod
    def of(cls, states: torch.Tensor, shrinkage: float) -> _Whitening:
        states = states.double()
        mean = states.mean(0)
        covariance = torch.cov((states - mean).T)  # (hidden, hidden)
        identity = torch.eye(covariance.shape[0], dtype=covariance.dtype, device=covariance.device)
        covariance = (1 - shrinkage) * covariance + shrinkage * covariance.diagonal().mean() * identity
        values, vectors = torch.linalg.eigh(covariance)
        values = values.clamp_min(1e-9 * float(values.max().clamp_min(1e-30)))
        return cls(mean=mean, inverse_root=(vectors * values.rsqrt()) @ vectors.T,
                   root=(vectors * values.sqrt()) @ vectors.T)

    def whiten(self, states: torch.Tensor) -> torch.Tensor:
        return (states.double() - self.mean) @ self.inverse_root

    def colour(self, white: torch.Tensor) -> torch.Tensor:
        return white @ self.root + self.mean


def _shared_prefix(received: torch.Tensor, attention_mask: torch.Tensor, longest: int) -> int:
    """How many leading positions (at most ``longest``) hold the same token in every example.

    A position counts when its states differ across examples by less than ``SHARED_PREFIX_RATIO``
    times the typical distance between states of different positions: identical tokens differ
    only by the noise. Needs two examples or more.
    """
    batch = received.shape[0]
    length = min(longest, int(attention_mask.sum(-1).min()))
    if batch < 2 or length < 1:
        return 0
    states = received[:, :length].float()  # (batch, length, hidden)
    across = (states[:, None] - states[None]).norm(dim=-1)  # (batch, batch, length)
    pairs = ~torch.eye(batch, dtype=torch.bool, device=received.device)
    same_position = across[pairs].median(0).values  # (length,)
    real = received[attention_mask.bool()].float()  # (n, hidden)
    shifted = real.roll(1, 0)
    different = (real - shifted).norm(dim=-1).median()
    shared = 0
    for distance in same_position.tolist():
        if distance >= SHARED_PREFIX_RATIO * float(different):
            break
        shared += 1
    return shared


@torch.no_grad()
def _public_states(public_bottom: Bottom, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The public Bottom's output (batch, seq, hidden) for ``tokens``, float32."""
    return public_bottom(tokens, attention_mask).float()


def _fit_map(source: torch.Tensor, target: torch.Tensor, ridge: float) -> torch.Tensor:
    """The (hidden, hidden) map M minimising |source M - target|^2 + ridge * n * |M - I|^2 (whitened rows)."""
    hidden = source.shape[1]
    identity = torch.eye(hidden, dtype=source.dtype, device=source.device)
    gram = source.T @ source + ridge * source.shape[0] * identity  # (hidden, hidden)
    return identity + torch.linalg.solve(gram, source.T @ (target - source))


def _read(inversion: attacks.InversionMap, embeddings: torch.Tensor, aligned: torch.Tensor, k: int) -> torch.Tensor:
    """The k nearest tokens (n, k) of aligned states (n, hidden) through the public linear map."""
    return attacks.nearest_tokens(inversion.predict(aligned.float()), embeddings, k)


def _grid(flat: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Scatter per-position values (n, ...) into a (batch, seq, ...) grid of zeros."""
    out = torch.zeros(*real.shape, *flat.shape[1:], dtype=flat.dtype, device=flat.device)
    out[real] = flat
    return out


@torch.no_grad()
def _aligned_search(public_bottom: Bottom, aligned: torch.Tensor, attention_mask: torch.Tensor,
                    candidates: torch.Tensor, whitening: _Whitening) -> torch.Tensor:
    """Left to right, the candidate whose public state is nearest ``aligned`` (batch, seq, hidden) in
    whitened coordinates; as ``attacks.exact_search``, all candidates of all examples in one step on a
    shared KV cache that follows each example's winner. Returns the tokens (batch, seq)."""
    batch, length, k = candidates.shape
    rows = batch * k
    device = aligned.device
    cache = DynamicCache(config=public_bottom.config)
    chosen = torch.zeros(batch, length, dtype=torch.long, device=device)
    row_base = torch.arange(batch, device=device) * k  # (batch,)
    target = whitening.whiten(aligned).float()  # (batch, seq, hidden)
    inverse_root = whitening.inverse_root.float()
    for position in range(int(attention_mask.sum(-1).max())):
        step_ids = candidates[:, position, :].reshape(rows, 1)  # (batch * k, 1)
        mask = torch.ones(rows, position + 1, dtype=torch.long, device=device)
        hidden = public_bottom(step_ids, mask, past_key_values=cache, use_cache=True)  # (batch * k, 1, hidden)
        white = (hidden.view(batch, k, -1).float() - whitening.mean.float()) @ inverse_root  # (batch, k, hidden)
        distance = (white - target[:, position, None, :]).norm(dim=-1)  # (batch, k)
        winner = distance.argmin(-1)  # (batch,)
        chosen[:, position] = candidates[:, position, :].gather(1, winner[:, None])[:, 0]
        cache.reorder_cache((row_base + winner).repeat_interleave(k))
    return chosen.masked_fill(~attention_mask.bool(), 0)


def _unexplained(states: torch.Tensor, predicted: torch.Tensor) -> float:
    """The share of the variance of ``states`` (n, hidden) that ``predicted`` (n, hidden) leaves unexplained."""
    spread = (states - states.mean(0)).pow(2).sum().clamp_min(1e-30)
    return float((states - predicted).pow(2).sum() / spread)


@torch.no_grad()
def aligned_inversion(public_bottom: Bottom, received: torch.Tensor, attention_mask: torch.Tensor,
                      public_hidden: torch.Tensor, public_ids: torch.Tensor, embeddings: torch.Tensor,
                      inversion: attacks.InversionMap, k: int,
                      config: AlignmentConfig = AlignmentConfig()) -> attacks.TokenGuesses:
    """Read ``received`` (batch, seq, hidden) after aligning it to the public Bottom's output space.

    ``public_hidden`` (n, hidden) and ``public_ids`` (n,) are the public Bottom's states on the
    attacker's public text and their tokens (``attacks.public_hidden_states``), ``inversion`` the
    linear map fit on them, ``embeddings`` the input embedding matrix (vocab, hidden), ``k`` the
    candidates per position. Returns the best guess per position and ``k`` ranked candidates.
    Deterministic: the same inputs give the same guesses.
    """
    if received.dim() != 3 or attention_mask.shape != received.shape[:2]:
        raise ValueError(f"received must be (batch, seq, hidden) with a (batch, seq) mask, got {tuple(received.shape)} "
                         f"and {tuple(attention_mask.shape)}")
    if public_hidden.dim() != 2 or public_hidden.shape[1] != received.shape[2] or public_ids.shape != public_hidden.shape[:1]:
        raise ValueError(f"public_hidden must be (n, {received.shape[2]}) with n public_ids, got "
                         f"{tuple(public_hidden.shape)} and {tuple(public_ids.shape)}")
    _check_whole("number of candidates k", k, 1, embeddings.shape[0])
    device = received.device
    real = attention_mask.bool()
    states = received[real].double()  # (n, hidden)
    public = _Whitening.of(public_hidden.to(device), config.shrinkage)
    own = _Whitening.of(states, config.shrinkage)
    white = own.whiten(states)  # (n, hidden)

    positions = torch.arange(received.shape[1], device=device).expand_as(attention_mask)[real]  # (n,)
    shared = _shared_prefix(received, attention_mask, len(config.anchor_ids))
    anchored = positions < shared  # (n,)
    anchor_tokens = torch.tensor(config.anchor_ids[:shared] or [0], dtype=torch.long, device=device)
    anchor_of = anchor_tokens[positions.clamp_max(max(shared - 1, 0))]  # (n,) the template's token there

    mapping = torch.eye(white.shape[1], dtype=torch.float64, device=device)
    ranked = _read(inversion, embeddings, public.colour(white @ mapping), k)  # (n, k)
    for _ in range(config.rounds):
        guess = torch.where(anchored, anchor_of, ranked[:, 0])
        target = public.whiten(_public_states(public_bottom, _grid(guess, real), attention_mask)[real])  # (n, hidden)
        mapping = _fit_map(white, target, config.ridge)
        ranked = _read(inversion, embeddings, public.colour(white @ mapping), k)
    ranked[anchored, 0] = anchor_of[anchored]
    candidates = _grid(ranked, real)  # (batch, seq, k)

    # Does the public Bottom itself explain the received states? Each reading's public-Bottom states are
    # compared with the states it read, as a share of their variance left unexplained: the public reading
    # against the received states as they are, the aligned one in the aligned (whitened) space. With no
    # private Bottom the public reading explains most of it; against a private one, no more than their mean.
    plain = attacks.learned_inversion(inversion, embeddings, received, attention_mask, k)
    plain_states = _public_states(public_bottom, plain.tokens, attention_mask)[real]  # (n, hidden)
    plain_unexplained = _unexplained(states, plain_states.double())
    aligned_white = white @ mapping  # (n, hidden)
    aligned_states = _public_states(public_bottom, candidates[..., 0], attention_mask)[real]  # (n, hidden)
    if plain_unexplained < min(1.0, _unexplained(aligned_white, public.whiten(aligned_states))):
        tokens = plain.tokens
        if config.search:
            tokens = attacks.exact_search(public_bottom, received, attention_mask, plain.candidates).tokens
        return attacks.TokenGuesses(tokens=tokens, candidates=plain.candidates)
    tokens = candidates[..., 0]
    if config.search:
        aligned = public.colour(aligned_white)  # (n, hidden)
        tokens = _aligned_search(public_bottom, _grid(aligned, real), attention_mask, candidates, public)
    return attacks.TokenGuesses(tokens=tokens.masked_fill(~real, 0), candidates=candidates)
