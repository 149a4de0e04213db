"""Three ways an honest-but-curious trunk owner reads a data owner's tokens.

The trunk owner holds the public base weights, so it can run the public Bottom and Top
itself; it has public text of its own (``public_text``); it knows the cut and the defense
settings, but not the client's secret, so it cannot regenerate the client's noise. It sees
the hidden states the client's Bottom sends (after ``ChannelNoise.on_hidden``) and the
gradients the client sends back (d loss / d Top input, after ``ChannelNoise.on_gradient``).

* ``learned_inversion``: a linear map, fit in closed form (ridge regression) on the public
  Bottom's output for public text, from a hidden state to the input embedding of its
  token; the nearest vocabulary embedding (cosine) is the guess. The attacker adds the
  defense's clipped noise to its own training data (with its own randomness), so the map
  is fit for noisy inputs.
* ``exact_search``: left to right, each of the learned attack's top candidates is run
  through the public Bottom after the prefix read so far (all candidates of all examples
  in one batch, reusing a KV cache of the prefix); the candidate whose hidden state lies
  closest (L2) to the received one wins.
* ``gradient_search``: differentiates through the public Top's blocks. The gradient the
  client sends is linear in the one-hot labels: ``g = s A(P - Y)`` with ``A`` the Jacobian
  transpose of the Top's logits at its input (the trunk owner holds the Top and its input),
  ``P`` the Top's predictions and ``s`` one over the labelled tokens of the step. Each of
  ``gradient_labels``' best candidates is scored by how well the gradient it implies (one
  backward pass through the public Top per candidate rank, all positions at once) explains
  the received one; the best explanation wins, and the search is repeated from the new
  guesses.
* ``gradient_labels``: reads the labels (the next input tokens) from the gradient at the
  Top's input. With the client's Top LoRA still zero (the start of a run), the trunk owner
  knows the Top's input (its own output) and can run the public Top: the gradient at
  position t is about ``N_t^T W^T (p_t - e_y) / n`` (``N_t`` the final norm's Jacobian, the
  Top's blocks passed through their residual stream, ``W`` the LM head, ``p_t`` the public
  Top's prediction, ``n`` the labelled tokens of the batch), and every
  vocabulary token ``y`` is scored by the cosine between that candidate and the received
  gradient.

Each attack returns per-position guesses; ``recovery`` counts the ones read exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from splitcore.data.examples import IGNORE_INDEX, TokenizedExample
from splitcore.model.parts import Bottom, Top
from splitcore.privacy.noise import CLIP_MULTIPLE, clip_and_noise
from splitcore.training.batches import collate

# Ridge penalty, relative to the number of public positions, on standardised features.
RIDGE = 1e-3
# Positions scored against the whole vocabulary at once (bounds memory to ~rows * vocab floats).
VOCAB_SCORE_ROWS = 128
# Vocabulary rows (of the embedding matrix or the LM head) cast to float32 at once: the audit
# never holds a float copy of a whole (vocab, hidden) matrix, only one block of it
# (8192 x 3072 floats = 96 MiB, against 1.5 GiB for a 128,256-token vocabulary).
VOCAB_BLOCK_ROWS = 8192
PUBLIC_BATCH = 16


@dataclass(frozen=True)
class TokenGuesses:
    """An attack's reading of a (batch, seq) grid of tokens.

    ``tokens``: the best guess per position. ``candidates``: guesses ranked best first
    (batch, seq, k), when the attack ranks several.
    """

    tokens: torch.Tensor  # (batch, seq) int64
    candidates: torch.Tensor | None = None  # (batch, seq, k) int64


def recovery(guessed: torch.Tensor, actual: torch.Tensor, scored: torch.Tensor) -> tuple[int, int]:
    """(positions read exactly, positions scored) over the ``scored`` positions."""
    scored = scored.bool()
    return int((guessed.eq(actual) & scored).sum()), int(scored.sum())


# --- learned inversion ---------------------------------------------------------------------


@dataclass(frozen=True)
class InversionMap:
    """A linear map from a hidden state to a token's input embedding, on standardised features."""

    mean: torch.Tensor  # (hidden,)
    scale: torch.Tensor  # (hidden,)
    weight: torch.Tensor  # (hidden, embed)
    bias: torch.Tensor  # (embed,)

    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, hidden) -> predicted embeddings (n, embed)."""
        features = (hidden.double() - self.mean) / self.scale  # (n, hidden)
        return (features @ self.weight + self.bias).float()  # (n, embed)


def fit_inversion(hidden: torch.Tensor, embeddings: torch.Tensor, ridge: float = RIDGE) -> InversionMap:
    """Closed-form ridge regression from ``hidden`` (n, hidden) to ``embeddings`` (n, embed)."""
    if hidden.shape[0] != embeddings.shape[0] or hidden.shape[0] < 2:
        raise ValueError(f"need at least two matching rows to fit, got {hidden.shape[0]} hidden states and "
                         f"{embeddings.shape[0]} targets")
    features = hidden.double()
    mean = features.mean(0)
    scale = features.std(0).clamp_min(1e-6)
    features = (features - mean) / scale  # (n, hidden)
    targets = embeddings.double()
    bias = targets.mean(0)
    gram = features.T @ features  # (hidden, hidden)
    gram.diagonal().add_(ridge * features.shape[0])
    weight = torch.linalg.solve(gram, features.T @ (targets - bias))  # (hidden, embed)
    return InversionMap(mean=mean, scale=scale, weight=weight, bias=bias)


@torch.no_grad()
def public_hidden_states(bottom: Bottom, chunks: Sequence[Sequence[int]], pad_token_id: int,
                         hidden_noise: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The public Bottom's output on public text, blurred as the defense would blur it.

    Returns (hidden states (n, hidden), their token ids (n,)) over the chunks' real positions.
    """
    states, tokens = [], []
    device = next(bottom.parameters()).device
    examples = [TokenizedExample(input_ids=tuple(c), labels=tuple(c), full_length=len(c)) for c in chunks]
    for start in range(0, len(examples), PUBLIC_BATCH):
        batch = collate(examples[start:start + PUBLIC_BATCH], pad_token_id)
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        hidden = clip_and_noise(bottom(ids, mask), mask, hidden_noise, generator)  # (batch, seq, hidden)
        real = mask.bool()
        states.append(hidden[real].float())
        tokens.append(ids[real])
    return torch.cat(states), torch.cat(tokens)


def _vocab_blocks(weight: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """Walk a (vocab, hidden) matrix ``VOCAB_BLOCK_ROWS`` rows at a time: (rows, float32 copy of those rows).

    Only the block is cast, so a bf16 matrix is never copied whole to float32.
    """
    weight = weight.detach()
    vocab = weight.shape[0]
    for start in range(0, vocab, VOCAB_BLOCK_ROWS):
        rows = slice(start, min(start + VOCAB_BLOCK_ROWS, vocab))
        yield rows, weight[rows].float()  # (block, hidden)


def _vocab_products(weight: torch.Tensor, *queries: torch.Tensor) -> list[torch.Tensor]:
    """``query @ weight.T`` (rows, vocab) for each float32 (rows, hidden) query, one vocabulary block at a time."""
    vocab = weight.shape[0]
    products = [torch.empty(query.shape[0], vocab, dtype=torch.float32, device=query.device) for query in queries]
    for rows, block in _vocab_blocks(weight):
        for query, product in zip(queries, products):
            product[:, rows] = query @ block.T
    return products


@torch.no_grad()
def nearest_tokens(predicted: torch.Tensor, embeddings: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` vocabulary rows closest in cosine to each predicted embedding: (n, k), best first.

    The vocabulary is read block by block (``_vocab_blocks``): the dot products with the
    normalised predictions are divided by the rows' norms (clamped as ``F.normalize`` clamps).
    """
    vocab = embeddings.shape[0]
    norms = torch.empty(vocab, dtype=torch.float32, device=predicted.device)  # (vocab,)
    for rows, block in _vocab_blocks(embeddings):
        norms[rows] = block.norm(dim=-1).clamp_min(1e-12)
    ranked = []
    for start in range(0, predicted.shape[0], VOCAB_SCORE_ROWS):
        query = F.normalize(predicted[start:start + VOCAB_SCORE_ROWS].float(), dim=-1)  # (rows, embed)
        (scores,) = _vocab_products(embeddings, query)  # (rows, vocab)
        scores.div_(norms)
        ranked.append(scores.topk(min(k, vocab), dim=-1).indices)
    return torch.cat(ranked)


@torch.no_grad()
def learned_inversion(inversion: InversionMap, embeddings: torch.Tensor, received: torch.Tensor,
                      attention_mask: torch.Tensor, k: int) -> TokenGuesses:
    """Read each real position of ``received`` (batch, seq, hidden) through ``inversion``."""
    real = attention_mask.bool()
    ranked = nearest_tokens(inversion.predict(received[real].float()), embeddings, k)  # (n, k)
    candidates = torch.zeros(*received.shape[:2], ranked.shape[1], dtype=torch.long,
                             device=received.device)  # (batch, seq, k)
    candidates[real] = ranked
    return TokenGuesses(tokens=candidates[..., 0], candidates=candidates)


# --- exact search --------------------------------------------------------------------------


def defense_clip_bound(received: torch.Tensor, attention_mask: torch.Tensor, hidden_noise: float) -> float | None:
    """The norm the defense clipped each position to, as the attacker estimates it (None: no clipping).

    The defense clips to ``CLIP_MULTIPLE`` times the median clean norm; the received
    norms are inflated by the noise to about ``sqrt(1 + hidden_noise**2)`` times the clean ones.
    """
    if hidden_noise <= 0:
        return None
    received_norms = received.float().norm(dim=-1)[attention_mask.bool()]  # (n,)
    return float(CLIP_MULTIPLE * received_norms.median() / math.sqrt(1.0 + hidden_noise ** 2))


def _clip(hidden: torch.Tensor, bound: float | None) -> torch.Tensor:
    if bound is None:
        return hidden
    norms = hidden.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return hidden * torch.clamp(bound / norms, max=1.0)


@torch.no_grad()
def exact_search(bottom: Bottom, received: torch.Tensor, attention_mask: torch.Tensor, candidates: torch.Tensor,
                 hidden_noise: float = 0.0) -> TokenGuesses:
    """Pick, left to right, the candidate whose public Bottom output is nearest the received one.

    ``candidates`` (batch, seq, k) are tried at each position after the prefix chosen so
    far; the whole batch's candidates run as one (batch * k, 1) step on a shared KV cache,
    which is then reordered so every row continues from its example's winner. With hidden
    noise on, the candidates are clipped as the defense clipped the received states.
    """
    batch, length, k = candidates.shape
    rows = batch * k
    device = received.device
    cache = DynamicCache(config=bottom.config)
    chosen = torch.zeros(batch, length, dtype=torch.long, device=device)
    lengths = attention_mask.sum(-1)  # (batch,)
    row_base = torch.arange(batch, device=device) * k  # (batch,)
    bound = defense_clip_bound(received, attention_mask, hidden_noise)
    for position in range(int(lengths.max())):
        step_ids = candidates[:, position, :].reshape(rows, 1)  # (batch * k, 1)
        mask = torch.ones(rows, position + 1, dtype=torch.long, device=device)
        hidden = bottom(step_ids, mask, past_key_values=cache, use_cache=True)  # (batch * k, 1, hidden)
        hidden = _clip(hidden.view(batch, k, -1).float(), bound)  # (batch, k, hidden)
        distance = (hidden - received[:, position, None, :].float()).norm(dim=-1)  # (batch, k)
        winner = distance.argmin(-1)  # (batch,)
        chosen[:, position] = candidates[:, position, :].gather(1, winner[:, None])[:, 0]
        cache.reorder_cache((row_base + winner).repeat_interleave(k))
    return TokenGuesses(tokens=chosen.masked_fill(~attention_mask.bool(), 0))


# --- gradient channel ----------------------------------------------------------------------


@dataclass(frozen=True)
class _TopReadout:
    pre_norm: torch.Tensor  # (n, hidden) input of the final norm at the scored positions
    expected_head: torch.Tensor  # (n, hidden) W^T p: the LM head's rows weighted by the prediction


def _top_readout(top: Top, trunk_output: torch.Tensor, attention_mask: torch.Tensor,
                 positions: torch.Tensor) -> _TopReadout:
    """Run the public Top once and keep what the label scores need at ``positions``."""
    final_norm = getattr(top.backbone, top.family.final_norm_attr)
    captured: dict[str, torch.Tensor] = {}
    hook = final_norm.register_forward_hook(lambda module, inputs, output: captured.update(pre=inputs[0]))
    try:
        logits = top(trunk_output, attention_mask).logits  # (batch, seq, vocab)
    finally:
        hook.remove()
    probs = logits[positions].float().softmax(-1)  # (n, vocab)
    weight = top.lm_head.weight
    expected_head = torch.zeros(probs.shape[0], weight.shape[1], dtype=torch.float32, device=probs.device)
    for rows, block in _vocab_blocks(weight):
        expected_head.addmm_(probs[:, rows], block)  # += p[rows] @ W[rows]
    return _TopReadout(pre_norm=captured["pre"][positions].float(), expected_head=expected_head)


def _jacobian_times(module: torch.nn.Module, inputs: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``J direction`` for the Jacobian J of ``module`` at ``inputs``, by differentiating a
    vector-Jacobian product (no forward-mode autodiff needed)."""
    with torch.enable_grad():
        inputs = inputs.detach().requires_grad_()
        outputs = module(inputs)
        probe = torch.zeros_like(outputs, requires_grad=True)
        (transposed,) = torch.autograd.grad(outputs, inputs, probe, create_graph=True)  # J^T probe
        (product,) = torch.autograd.grad(transposed, probe, direction)  # J direction
    return product.detach()


@torch.no_grad()
def gradient_labels(top: Top, trunk_output: torch.Tensor, attention_mask: torch.Tensor, received: torch.Tensor,
                    positions: torch.Tensor | None = None, k: int = 1) -> TokenGuesses:
    """Guess the label (next token) at each position from the received gradient (batch, seq, hidden).

    For every vocabulary token ``y`` the candidate gradient is ``N^T (W^T p - W_y)`` with
    ``N`` the final norm's Jacobian at that position; the score is its cosine with the
    received gradient, computed as ``(N g) . (W^T p - W_y) / |gamma * (W^T p - W_y)|``
    (``N g`` exactly, by differentiating the norm twice; in the denominator the norm's
    Jacobian is approximated by its weight ``gamma``). The Top's blocks are taken as the
    identity: their residual stream carries the gradient through almost unchanged when the
    Top is shallow, and a deeper Top blurs the reading.
    ``positions`` (batch, seq) bool limits the work to the positions that will be scored
    (the guess at a position does not depend on the others); default: all real positions.
    The LM head is read block by block (``_vocab_blocks``), never copied whole to float32.
    """
    if positions is None:
        positions = attention_mask.bool()
    weight = top.lm_head.weight  # (vocab, hidden)
    vocab, hidden = weight.shape
    k = min(k, vocab)
    readout = _top_readout(top, trunk_output, attention_mask, positions)
    final_norm = getattr(top.backbone, top.family.final_norm_attr)
    gradient = received[positions].float()  # (n, hidden)
    norm_times_gradient = _jacobian_times(final_norm, readout.pre_norm, gradient)  # (n, hidden)
    gamma = top.family.norm_gain(final_norm)  # Gemma's norms scale by 1 + weight
    gamma = (torch.ones(hidden, dtype=torch.float32, device=weight.device) if gamma is None
             else gamma.detach().float())  # (hidden,)
    head_gamma_sq = torch.empty(vocab, dtype=torch.float32, device=weight.device)  # (vocab,) |gamma * W_y|^2
    for block_rows, block in _vocab_blocks(weight):
        block_gamma = block * gamma  # (block, hidden)
        head_gamma_sq[block_rows] = (block_gamma * block_gamma).sum(-1)
    ranked = []
    for start in range(0, gradient.shape[0], VOCAB_SCORE_ROWS):
        rows = slice(start, start + VOCAB_SCORE_ROWS)
        expected = readout.expected_head[rows]  # (rows, hidden)
        direction = norm_times_gradient[rows]  # (rows, hidden)
        expected_gamma = expected * gamma
        # numerator = N g . (W^T p) - N g . W_y; squared = |gamma W^T p|^2 - 2 gamma W^T p . gamma W_y + |gamma W_y|^2
        numerator, squared = _vocab_products(weight, direction, expected_gamma * gamma)  # (rows, vocab) each
        numerator.neg_().add_((direction * expected).sum(-1, keepdim=True))
        squared.mul_(-2).add_((expected_gamma * expected_gamma).sum(-1, keepdim=True)).add_(head_gamma_sq)
        scores = numerator.div_(squared.clamp_min_(1e-20).sqrt_())
        ranked.append(scores.topk(k, dim=-1).indices)
    candidates = torch.zeros(*received.shape[:2], k, dtype=torch.long, device=received.device)  # (batch, seq, k)
    candidates[positions] = torch.cat(ranked)
    return TokenGuesses(tokens=candidates[..., 0], candidates=candidates)


def gradient_search(top: Top, trunk_output: torch.Tensor, attention_mask: torch.Tensor, received: torch.Tensor,
                    candidates: torch.Tensor, positions: torch.Tensor, rounds: int = 2) -> TokenGuesses:
    """Pick each labelled position's label among ``candidates`` (batch, seq, k) by the gradient it implies.

    With labels ``Y`` the client's gradient at the Top's input is ``s A(P - Y)``: ``A(U)`` is the
    gradient of ``sum_t <logits_t, U_t>`` over the ``positions`` (bool (batch, seq)), one backward
    pass through the public Top. Starting from the candidates ranked first, for every rank ``j`` the
    labels are switched to rank ``j``'s candidates at once and the squared distance between the
    received gradient and the implied one (``s`` fitted by least squares) is measured per position;
    each position keeps the rank that explains its gradient best. A position's own label dominates
    its gradient, the other positions' labels reach it only through attention, so switching all
    positions at once reads each position nearly as switching it alone would. Costs ``k + rounds``
    backward passes through the Top (the logits graph is kept for all of them).
    """
    k = candidates.shape[-1]
    candidates_here = candidates[positions]  # (n, k): only the scored positions get logits
    with torch.enable_grad():
        inputs = trunk_output.detach().requires_grad_()
        logits = top.head_logits(top.final_hidden(inputs, attention_mask)[positions])  # (n, vocab)

        def implied(objective: torch.Tensor) -> torch.Tensor:
            (gradient,) = torch.autograd.grad(objective, inputs, retain_graph=True)
            return gradient.detach().float()  # (batch, seq, hidden)

        def one_hot(tokens: torch.Tensor) -> torch.Tensor:  # A(Y) for labels ``tokens`` (n,)
            return implied(logits.gather(-1, tokens[:, None]).sum())

        with torch.no_grad():
            probs = logits.detach().float().softmax(-1)
        expected = implied((logits.float() * probs).sum())  # A(P)
        by_rank = [one_hot(candidates_here[:, rank]) for rank in range(k)]  # A(C_j), each (batch, seq, hidden)
        guess = candidates_here[:, 0]
        current = by_rank[0]  # A(Y) for the first guess, already computed
        received = received.float()
        for round_index in range(rounds):
            if round_index:
                current = one_hot(guess)  # A(Y) for the new guess
            implied_now = expected - current
            scale = ((received * implied_now)[positions].sum()
                     / (implied_now * implied_now)[positions].sum().clamp_min(1e-30))
            distances = torch.stack([((received - scale * (implied_now + current - switched)) ** 2).sum(-1)
                                     for switched in by_rank], -1)[positions]  # (n, k)
            guess = candidates_here.gather(-1, distances.argmin(-1, keepdim=True))[:, 0]
    tokens = torch.zeros(positions.shape, dtype=torch.long, device=received.device)  # (batch, seq)
    tokens[positions] = guess
    return TokenGuesses(tokens=tokens, candidates=candidates)


def label_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the label each position predicts (batch, seq), whether it is labelled) — labels shift by one."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    labelled = targets.ne(IGNORE_INDEX)
    return targets.clamp_min(0), labelled
