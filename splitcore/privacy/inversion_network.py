"""A learned inversion stronger than a linear map: a small network from hidden states to tokens.

The trunk owner of ``attacks`` fits a linear map from one hidden state to its token's input
embedding. This attacker trains a network for it on the same public states:

* the states at positions t-before .. t+after are read for token t (a causal model's state
  at t+1 also carries token t); each position is standardised with the public states'
  per-feature mean and spread, missing neighbours (before the start, after the end,
  padding) are zero, and each neighbour's presence is a feature of its own;
* a linear path from the window to the embedding, fit in closed form (ridge regression, as
  the linear map is fit) and then frozen, plus an MLP (LayerNorm, ``layers`` hidden layers
  of ``units`` with GELU) whose output layer starts at zero: training starts from the
  linear map and moves away from it where the loss says so (without that start, the same
  training reads far less);
* the predicted embedding is scored against vocabulary rows by cosine (as
  ``attacks.nearest_tokens`` scores it), with a softmax over the batch's own tokens and
  ``negatives`` vocabulary rows drawn per step, trained with AdamW for ``epochs`` passes.

Measured on the default model (SmolLM2-135M-Instruct) and the demo data with 32k tokens of
the extended public corpus (``benchmarks/inversion_network.py``), the network reads far more
than the linear map fit on the same states: 93.5% of the tokens against 77.7% behind 8
blocks, 99.7% against 91.1% behind 2, 66.7% against 54.0% behind 2 blocks with hidden noise
2; against a private Bottom (1) both read little (7.6% against 5.9%), as the network too
learns the public Bottom only. The fit takes about 20 CPU seconds there. The window is off
by default (``before = after = 0``): at these amounts of public text the neighbours' states
made the network overfit and read fewer tokens behind 8 blocks, not more (88.2% with the
state after, 85.0% with one state on each side, against 93.5% alone).

Everything is drawn from generators seeded with ``config.seed``: the same public states and
config give the same network. The public states are those of ``public_hidden_grid``: the
public Bottom's output on public text, blurred as the defense would blur it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from splitcore.data.examples import TokenizedExample
from splitcore.privacy import attacks
from splitcore.privacy.noise import clip_and_noise
from splitcore.training.batches import collate


def _check_whole(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"the inversion network's {name} must be a whole number from {low} to {high}, got {value!r}")


def _check_positive(name: str, value: object, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= high:
        raise ValueError(f"the inversion network's {name} must be a number above 0 and at most {high:g}, "
                         f"got {value!r}")


@dataclass(frozen=True)
class InversionNetworkConfig:
    """How the inversion network is shaped and trained.

    ``before`` / ``after``: neighbouring positions read besides the token's own (a window of
    ``before + 1 + after`` states). ``units`` / ``layers``: width and number of the MLP's hidden
    layers. ``epochs``: passes over the public positions, ``batch_size`` positions per step,
    ``learning_rate`` AdamW's peak rate (cosine decay after a short warmup), ``weight_decay``
    AdamW's. ``negatives``: vocabulary rows drawn at random that each step scores besides the
    batch's own tokens. ``logit_scale``: cosine similarities are multiplied by this before the
    softmax. ``ridge``: the linear path's penalty, as in ``attacks.fit_inversion``. ``seed``: every
    random draw (initialisation, order, negatives).
    """

    before: int = 0
    after: int = 0
    units: int = 1536
    layers: int = 1
    epochs: int = 4
    batch_size: int = 512
    learning_rate: float = 2e-3
    weight_decay: float = 0.01
    negatives: int = 1024
    logit_scale: float = 20.0
    ridge: float = attacks.RIDGE
    seed: int = 0

    def __post_init__(self) -> None:
        _check_whole("positions before the token", self.before, 0, 16)
        _check_whole("positions after the token", self.after, 0, 16)
        _check_whole("hidden units", self.units, 1, 16384)
        _check_whole("hidden layers", self.layers, 1, 4)
        _check_whole("epochs", self.epochs, 0, 1000)
        _check_whole("batch size", self.batch_size, 1, 65536)
        _check_positive("learning rate", self.learning_rate, 1.0)
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)) \
                or not 0 <= self.weight_decay <= 1:
            raise ValueError(f"the inversion network's weight decay must be a number from 0 to 1, "
                             f"got {self.weight_decay!r}")
        _check_whole("sampled negatives", self.negatives, 0, 1 << 20)
        _check_positive("logit scale", self.logit_scale, 1000.0)
        _check_positive("ridge penalty", self.ridge, 1e6)
        _check_whole("seed", self.seed, 0, 2**63 - 1)

    @property
    def window(self) -> int:
        return self.before + 1 + self.after


# --- the public states -----------------------------------------------------------------------


@torch.no_grad()
def public_hidden_grid(bottom: nn.Module, chunks: Sequence[Sequence[int]], pad_token_id: int, hidden_noise: float,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The public Bottom's output on public ``chunks``, blurred as the defense would blur it, kept per chunk.

    Returns (hidden (n_chunks, seq, hidden) float32, mask (n_chunks, seq), ids (n_chunks, seq)),
    right-padded to the longest chunk; the noise is drawn per batch of ``attacks.PUBLIC_BATCH``
    chunks, as ``attacks.public_hidden_states`` draws it (the same generator gives the same states).
    """
    if not chunks:
        raise ValueError("public_hidden_grid needs at least one chunk of public tokens")
    device = next(bottom.parameters()).device
    length = max(len(chunk) for chunk in chunks)
    examples = [TokenizedExample(input_ids=tuple(c), labels=tuple(c), full_length=len(c)) for c in chunks]
    hidden_grid, mask_grid, id_grid = None, [], []
    for start in range(0, len(examples), attacks.PUBLIC_BATCH):
        batch = collate(examples[start:start + attacks.PUBLIC_BATCH], pad_token_id)
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        hidden = clip_and_noise(bottom(ids, mask), mask, hidden_noise, generator).float()  # (batch, seq, hidden)
        if hidden_grid is None:
            hidden_grid = torch.zeros(len(chunks), length, hidden.shape[-1], dtype=torch.float32, device=device)
        hidden_grid[start:start + ids.shape[0], :ids.shape[1]] = hidden
        pad = length - ids.shape[1]
        mask_grid.append(F.pad(mask, (0, pad)))
        id_grid.append(F.pad(ids, (0, pad), value=pad_token_id))
    return hidden_grid, torch.cat(mask_grid), torch.cat(id_grid)


# --- window features -------------------------------------------------------------------------


def _standardise(hidden: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(batch, seq, hidden) -> standardised, zero at padding."""
    features = (hidden.float() - mean) / scale  # (batch, seq, hidden)
    return features * mask[..., None].to(features.dtype)


def _window_table(standardised: torch.Tensor, mask: torch.Tensor, before: int,
                  after: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the grid by ``before`` / ``after`` empty positions: (flat states (n * padded_seq, hidden),
    flat presence (n * padded_seq,)), so a window is a run of consecutive rows."""
    padded = F.pad(standardised, (0, 0, before, after))  # (n, before + seq + after, hidden)
    present = F.pad(mask.to(standardised.dtype), (before, after))  # (n, before + seq + after)
    return padded.reshape(-1, padded.shape[-1]), present.reshape(-1)


def _window_rows(mask: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """The flat padded-table row of each real position's window start: (n_real,), in (chunk, position) order."""
    chunk, position = mask.bool().nonzero(as_tuple=True)
    padded_length = mask.shape[1] + before + after
    return chunk * padded_length + position  # window of (chunk, t) starts at padded index t


def _gather_windows(table: torch.Tensor, present: torch.Tensor, starts: torch.Tensor, window: int) -> torch.Tensor:
    """(rows, window * hidden + window): the window's states side by side, then their presence flags."""
    offsets = starts[:, None] + torch.arange(window, device=starts.device)  # (rows, window)
    states = table[offsets].reshape(starts.shape[0], -1)  # (rows, window * hidden)
    return torch.cat([states, present[offsets]], dim=-1)  # (rows, window * (hidden + 1))


# --- the network -----------------------------------------------------------------------------


class InversionNetwork(nn.Module):
    """Window of standardised hidden states -> the predicted input embedding of the middle token."""

    def __init__(self, config: InversionNetworkConfig, hidden_size: int, embed_size: int) -> None:
        super().__init__()
        self.config = config
        features = config.window * (hidden_size + 1)
        self.register_buffer("mean", torch.zeros(hidden_size))
        self.register_buffer("scale", torch.ones(hidden_size))
        self.linear = nn.Linear(features, embed_size)
        widths = [features] + [config.units] * config.layers
        blocks: list[nn.Module] = [nn.LayerNorm(features)]
        for width_in, width_out in zip(widths, widths[1:]):
            blocks += [nn.Linear(width_in, width_out), nn.GELU()]
        blocks.append(nn.Linear(config.units, embed_size))
        self.mlp = nn.Sequential(*blocks)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """(rows, window * (hidden + 1)) -> predicted embeddings (rows, embed)."""
        return self.linear(windows) + self.mlp(windows)

    @torch.no_grad()
    def windows(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Every real position's window, in (example, position) order: (n_real, window * (hidden + 1))."""
        standardised = _standardise(hidden, attention_mask, self.mean, self.scale)  # (batch, seq, hidden)
        table, present = _window_table(standardised, attention_mask, self.config.before, self.config.after)
        starts = _window_rows(attention_mask, self.config.before, self.config.after)
        return _gather_windows(table, present, starts, self.config.window)


# --- fitting ---------------------------------------------------------------------------------


def _check_public(public_hidden: torch.Tensor, public_mask: torch.Tensor, public_ids: torch.Tensor,
                  embeddings: torch.Tensor) -> None:
    if public_hidden.dim() != 3:
        raise ValueError(f"public_hidden must be (n_chunks, seq, hidden), got shape {tuple(public_hidden.shape)}")
    if public_mask.shape != public_hidden.shape[:2] or public_ids.shape != public_hidden.shape[:2]:
        raise ValueError(f"public_mask {tuple(public_mask.shape)} and public_ids {tuple(public_ids.shape)} must be "
                         f"(n_chunks, seq) = {tuple(public_hidden.shape[:2])} like public_hidden")
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be the (vocab, embed) input embedding matrix, got shape "
                         f"{tuple(embeddings.shape)}")
    if int(public_mask.bool().sum()) < 2:
        raise ValueError("the inversion network needs at least two real public positions to fit")
    real_ids = public_ids[public_mask.bool()]
    if int(real_ids.min()) < 0 or int(real_ids.max()) >= embeddings.shape[0]:
        raise ValueError(f"public_ids hold token ids outside the vocabulary of {embeddings.shape[0]} rows")


def _feature_statistics(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and spread over the real positions, in float64 for the sums."""
    real = hidden[mask.bool()].double()  # (n, hidden)
    return real.mean(0).float(), real.std(0).clamp_min(1e-6).float()


@torch.no_grad()
def _fit_linear_path(network: InversionNetwork, windows: torch.Tensor, targets: torch.Tensor,
                     embeddings: torch.Tensor, ridge: float) -> None:
    """Ridge regression from the windows (n, features) to the embeddings of ``targets`` (n,), into ``network.linear``.

    The products with the targets' embeddings go through the distinct tokens: only their rows
    of ``embeddings`` are read, never an (n, embed) copy.
    """
    n = windows.shape[0]
    mean = windows.double().mean(0)
    spread = windows.double().std(0).clamp_min(1e-6)
    features = (windows - mean.float()) / spread.float()  # (n, features)
    tokens, which = torch.unique(targets, return_inverse=True)  # (u,), (n,)
    which = which.to(windows.device)
    rows = embeddings.detach()[tokens.to(embeddings.device)].to(windows.device, torch.float64)  # (u, embed)
    counts = torch.bincount(which, minlength=tokens.shape[0]).double()  # (u,)
    per_token = torch.zeros(tokens.shape[0], features.shape[1], dtype=torch.float32, device=windows.device)
    per_token.index_add_(0, which, features)  # (u, features): each token's features summed
    target_mean = counts @ rows / n  # (embed,)
    # Float32 products (the features are standardised, and the ridge bounds the smallest
    # eigenvalue far above their rounding), a float64 solve.
    gram = (features.T @ features).double()  # (features, features)
    gram.diagonal().add_(ridge * n)
    moments = per_token.double().T @ rows - features.double().sum(0)[:, None] * target_mean  # (features, embed)
    weight = torch.linalg.solve(gram, moments)  # (features, embed)
    weight = weight / spread[:, None]  # undo the windows' own standardisation
    network.linear.weight.copy_(weight.T.float())
    network.linear.bias.copy_((target_mean - mean @ weight).float())


def _initialise(network: InversionNetwork, generator: torch.Generator) -> None:
    """The MLP's hidden layers drawn from ``generator``; its output layer zero (training starts at the linear path)."""
    linears = [module for module in network.mlp if isinstance(module, nn.Linear)]
    with torch.no_grad():
        for layer in linears[:-1]:
            bound = 1.0 / math.sqrt(layer.in_features)
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.zero_()
        linears[-1].weight.zero_()
        linears[-1].bias.zero_()


def _unit_rows(embeddings: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The chosen vocabulary rows, float32 and of unit norm: (len(rows), embed)."""
    return F.normalize(embeddings.detach()[rows].float(), dim=-1)


def _step_candidates(targets: torch.Tensor, vocab: int, negatives: int,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The vocabulary rows one step scores: (sorted unique rows, each target's index among them)."""
    drawn = torch.randint(vocab, (negatives,), generator=generator)
    rows = torch.unique(torch.cat([targets, drawn]))  # sorted
    return rows, torch.searchsorted(rows, targets)


def _rate_factor(step: int, total_steps: int) -> float:
    """A linear warmup over the first 5% of the steps, then a cosine decay to zero."""
    warmup = max(1, total_steps // 20)
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


def fit_inversion_network(public_hidden: torch.Tensor, public_mask: torch.Tensor, public_ids: torch.Tensor,
                          embeddings: torch.Tensor,
                          config: InversionNetworkConfig = InversionNetworkConfig()) -> InversionNetwork:
    """Train an ``InversionNetwork`` on public states (n_chunks, seq, hidden) of tokens ``public_ids`` (n_chunks, seq).

    ``public_mask`` (n_chunks, seq) marks the real positions; ``embeddings`` is the public
    input embedding matrix (vocab, embed), read a block or a batch of rows at a time. Runs on
    the states' device; deterministic for a config (its ``seed``) on one machine.
    """
    if not isinstance(config, InversionNetworkConfig):
        raise ValueError(f"config must be an InversionNetworkConfig, got {type(config).__name__}")
    _check_public(public_hidden, public_mask, public_ids, embeddings)
    device = public_hidden.device
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):  # the layers' default draws would move the global generator
        network = InversionNetwork(config, public_hidden.shape[-1], embeddings.shape[1])
    _initialise(network, generator)  # on the CPU, where the generator draws
    network.to(device)
    network.mean, network.scale = _feature_statistics(public_hidden, public_mask)

    windows = network.windows(public_hidden, public_mask)  # (n, features)
    targets = public_ids[public_mask.bool()].cpu()  # (n,)
    _fit_linear_path(network, windows, targets, embeddings, config.ridge)
    network.linear.requires_grad_(False)

    steps_per_epoch = math.ceil(windows.shape[0] / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(network.mlp.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _rate_factor(step, total_steps))
    network.train()
    for _ in range(config.epochs):
        order = torch.randperm(windows.shape[0], generator=generator)
        for start in range(0, windows.shape[0], config.batch_size):
            rows = order[start:start + config.batch_size]
            step_targets = targets[rows]
            vocab_rows, target_index = _step_candidates(step_targets, embeddings.shape[0], config.negatives,
                                                        generator)
            candidates = _unit_rows(embeddings, vocab_rows.to(embeddings.device)).to(device)  # (c, embed)
            predicted = F.normalize(network(windows[rows.to(device)]), dim=-1)  # (rows, embed)
            logits = config.logit_scale * predicted @ candidates.T  # (rows, c)
            loss = F.cross_entropy(logits, target_index.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return network.eval()


@torch.no_grad()
def network_inversion(network: InversionNetwork, embeddings: torch.Tensor, received: torch.Tensor,
                      attention_mask: torch.Tensor, k: int) -> attacks.TokenGuesses:
    """Read each real position of ``received`` (batch, seq, hidden) through ``network``; ``k`` candidates ranked.

    Returns tokens (batch, seq) and candidates (batch, seq, k), like ``attacks.learned_inversion``.
    """
    if received.dim() != 3 or attention_mask.shape != received.shape[:2]:
        raise ValueError(f"received must be (batch, seq, hidden) with a (batch, seq) attention mask, got "
                         f"{tuple(received.shape)} and {tuple(attention_mask.shape)}")
    if received.shape[-1] != network.mean.shape[0]:
        raise ValueError(f"the network was fit on hidden states of size {network.mean.shape[0]}, got "
                         f"{received.shape[-1]}")
    _check_whole("k (candidates per position)", k, 1, 1 << 20)
    was_training = network.training
    network.eval()
    try:
        windows = network.windows(received.to(network.mean.device), attention_mask.to(network.mean.device))
        predicted = torch.cat([network(windows[start:start + attacks.VOCAB_SCORE_ROWS * 8])
                               for start in range(0, windows.shape[0], attacks.VOCAB_SCORE_ROWS * 8)])  # (n, embed)
    finally:
        network.train(was_training)
    ranked = attacks.nearest_tokens(predicted.to(embeddings.device), embeddings, k).to(received.device)  # (n, k)
    real = attention_mask.bool()
    candidates = torch.zeros(*received.shape[:2], ranked.shape[1], dtype=torch.long,
                             device=received.device)  # (batch, seq, k)
    candidates[real] = ranked
    return attacks.TokenGuesses(tokens=candidates[..., 0], candidates=candidates)
