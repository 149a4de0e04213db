"""A distilled private Bottom: the secret change absorbed on public text before any user data is sent.

A private Bottom (``private_bottom``) starts the client's Bottom LoRA as a secret random change of
each Bottom weight, so the trunk owner's copy of the public Bottom no longer matches it. A change
large enough to stop the audit's attacks also breaks the model, and a short fine-tuning run cannot
win it back. Distillation trains the Bottom's LoRA first, on public text only:

* **keep the public model's outputs**: the KL divergence between the next-token distributions of
  the teacher (the public Bottom -> the real trunk -> the client's Top, its LoRA still zero) and
  the student (the private Bottom -> the same trunk -> the same Top). Both go through the real
  trunk servers, on sessions without LoRA opened for the distillation and closed before the
  run's training sessions open, so the training sessions start exactly as without it.
* **resist a linear reading**: every ``refit_every`` steps a ridge map (``attacks.fit_inversion``)
  is fit from the private Bottom's *own* output on public probe text to the tokens' input
  embeddings, and the cosine between its predictions and the true embeddings is penalised. That
  is the attack of a trunk owner who holds labelled pairs of the private Bottom's output, which
  the distillation itself can hand it: the teacher's hidden states come from the public Bottom,
  which the audit's attacks read almost completely, and the student's hidden states of the same
  tokens follow. A linear map fit on those pairs covers any linear alignment of the private output
  to the public one too, and it gives the candidate search its candidates.

What it cannot hide: the trunk's output for the private Bottom's states has to carry what the
public Top needs for the public model's predictions, so a trunk owner who reads at the trunk's
output (or runs the public Top there) is not slowed by a distilled Bottom. On the default model at
a 2 + 2 cut, 100 steps win back most of the validation loss a private Bottom of 1 costs, and with
it the hidden-state attacks read most of the tokens again: the utility comes back with the
leakage. Measure before relying on it.

The public text is CPython's language reference (``public_text``), the same corpus the audit's
attacker uses; its order and the held-out part are drawn from the client's secret. The data
owner's own data is never used here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from splitcore.data.examples import TokenizedExample
from splitcore.privacy import attacks
from splitcore.privacy.client_secret import ClientSecret
from splitcore.privacy.public_text import public_token_chunks
from splitcore.remote.client import TrunkClient
from splitcore.remote.proto import trunk_pb2 as pb
from splitcore.remote.trunk import RemoteTrunk, TrunkLink
from splitcore.training.batches import Batch, collate

log = logging.getLogger(__name__)

# Seeds drawn from the client's secret: the public text's order, and the frozen sessions' seed.
DISTILL_ORDER = "distil-bottom-order"
DISTILL_TRUNK_SEED = "distil-bottom-trunk"
# Candidates per position when the report scores the linear reading of held-out public text.
READING_CANDIDATES = 1
# Rows per batch when the probe text runs through the Bottom alone (here, never sent to the trunk).
PROBE_ROWS = 16


def _whole(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"distillation: {name} must be a whole number from {low} to {high}, got {value!r}")


def _number(name: str, value: object, low: float, high: float, low_open: bool = False) -> None:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not low <= value <= high or (low_open and value == low)):
        bound = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise ValueError(f"distillation: {name} must be a number in {bound}, got {value!r}")


@dataclass(frozen=True)
class DistillConfig:
    """How a private Bottom is distilled.

    ``steps``: optimizer steps on the Bottom's LoRA. ``learning_rate``: AdamW's, constant, relative to
    each LoRA tensor's own root-mean-square size at the start (0.02: each step moves a tensor by about
    2% of its size).
    ``adversary_weight``: weight of the linear-reading penalty against the KL term (0: plain
    distillation, which tends to undo the secret change). ``public_tokens_per_step``: public
    tokens per step, cut into chunks of ``chunk_tokens`` and sent in calls of at most
    ``rows_per_call`` chunks (keep rows_per_call x chunk_tokens within the trunk's token budget
    per request). ``probe_tokens``: public tokens the adversary's map is refit on, every
    ``refit_every`` steps. ``heldout_tokens``: public tokens never trained on, on which the
    report measures the KL and the linear reading before and after. ``max_grad_norm``: clips
    each step's gradient (0: off).
    """

    steps: int
    learning_rate: float = 2e-2
    adversary_weight: float = 1.0
    public_tokens_per_step: int = 512
    chunk_tokens: int = 128
    rows_per_call: int = 4
    probe_tokens: int = 4096
    refit_every: int = 5
    heldout_tokens: int = 512
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        _whole("steps", self.steps, 1, 100_000)
        _number("learning_rate", self.learning_rate, 0.0, 1.0, low_open=True)
        _number("adversary_weight", self.adversary_weight, 0.0, 1000.0)
        _whole("chunk_tokens", self.chunk_tokens, 2, 8192)
        _whole("public_tokens_per_step", self.public_tokens_per_step, self.chunk_tokens, 1 << 20)
        _whole("rows_per_call", self.rows_per_call, 1, 4096)
        _whole("probe_tokens", self.probe_tokens, self.chunk_tokens, 1 << 20)
        _whole("refit_every", self.refit_every, 1, 100_000)
        _whole("heldout_tokens", self.heldout_tokens, self.chunk_tokens, 1 << 20)
        _number("max_grad_norm", self.max_grad_norm, 0.0, 1e6)

    @classmethod
    def for_run(cls, steps: int, batch_size: int, seq_len: int, **overrides) -> DistillConfig:
        """The distillation of a run: chunks no longer than its sequences and calls no larger than its
        micro-batches, so every call fits the trunk budgets the run itself was checked against."""
        chunk = min(cls.chunk_tokens, seq_len)
        sizes = {"chunk_tokens": chunk, "rows_per_call": batch_size,
                 "public_tokens_per_step": max(cls.public_tokens_per_step, chunk),
                 "probe_tokens": max(cls.probe_tokens, chunk), "heldout_tokens": max(cls.heldout_tokens, chunk)}
        return cls(steps=steps, **{**sizes, **overrides})

    @property
    def chunks_per_step(self) -> int:
        return max(1, self.public_tokens_per_step // self.chunk_tokens)


@dataclass(frozen=True)
class DistillReport:
    """What the distillation did, measured on held-out public text through the real trunk.

    ``kl``: mean KL divergence (nats per position) from the public model's next-token distribution
    to the client's; ``agreement``: share of positions whose most likely next token is the public
    model's; ``linear_reading``: share of tokens a ridge map fit on the Bottom's own output of the
    probe text reads exactly (what a trunk owner holding labelled pairs reads). Each before and
    after the distillation.
    """

    steps: int
    public_tokens: int
    seconds: float
    kl_before: float
    kl_after: float
    agreement_before: float
    agreement_after: float
    linear_reading_before: float
    linear_reading_after: float

    def describe(self) -> str:
        return (f"distilled the private Bottom for {self.steps} steps on {self.public_tokens} public tokens in "
                f"{self.seconds:.0f} s: KL to the public model {self.kl_before:.3f} -> {self.kl_after:.3f} nats, "
                f"next-token agreement {self.agreement_before:.1%} -> {self.agreement_after:.1%}, a linear map "
                f"fit on its own output reads {self.linear_reading_before:.1%} -> {self.linear_reading_after:.1%} "
                "of held-out public tokens")


class FrozenTrunkSessions:
    """One session without LoRA on each link of the trunk, for the distillation alone.

    Open it (``with``) before the run's training sessions: a client holds one session at a time,
    and the distillation's Forward, Backward and Step calls then never touch a training session.
    Each call of the distillation is a step of its own, applied with learning rate 0 (nothing to
    update: the sessions have no LoRA), so the trunk drops what it kept for it.
    """

    def __init__(self, clients: Sequence[TrunkClient], layers: Sequence[range], label: str = "", seed: int = 0,
                 check: Callable[[int, TrunkClient, pb.OpenSessionResponse], None] | None = None) -> None:
        """``check(index, client, reply)`` raises ValueError when a link's session does not serve this model
        (the sessions then close before anything is sent)."""
        if len(clients) != len(layers) or not clients:
            raise ValueError(f"a frozen trunk needs one layer range per client, got {len(clients)} clients and "
                             f"{len(layers)} ranges")
        self.links = [TrunkLink(client, layers=own) for client, own in zip(clients, layers, strict=True)]
        self.label = label
        self.seed = seed
        self.check = check
        self.calls = 0

    def __enter__(self) -> FrozenTrunkSessions:
        busy = [link.client.name for link in self.links if link.client.session_id is not None]
        if busy:
            raise ValueError(f"the distillation opens its own sessions before the training sessions, but the client "
                             f"of {busy[0]} already holds a session; distil before opening the run's sessions")
        try:
            for index, link in enumerate(self.links):
                reply = link.client.open_session(None, seed=self.seed, label=self.label, layers=link.layers)
                if self.check is not None:
                    self.check(index, link.client, reply)
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._close()

    def _close(self) -> None:
        for link in self.links:
            link.client.close_session_quietly()

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The trunk's output (batch, seq, hidden), differentiable: the Backward RPC returns the input's gradient.
        Call ``finish_call`` after the backward pass."""
        self.calls += 1
        for link in self.links:
            hidden = RemoteTrunk.apply(hidden, attention_mask, link, self.calls, 0)  # (batch, seq, hidden)
        return hidden

    def finish_call(self) -> None:
        for link in self.links:
            link.client.step(self.calls, lr=0.0)

    @torch.no_grad()
    def evaluate(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The trunk's output (batch, seq, hidden) without gradient; nothing is kept on the trunk."""
        for link in self.links:
            hidden = link.client.evaluate(hidden, attention_mask)
        return hidden


@dataclass(frozen=True)
class _PublicText:
    train: tuple[tuple[int, ...], ...]
    probe: tuple[tuple[int, ...], ...]
    heldout: tuple[tuple[int, ...], ...]


def _public_text(tokenizer, config: DistillConfig, order_seed: int) -> _PublicText:
    """The public chunks in an order drawn from the secret: held-out and probe chunks first, then the
    training chunks (cycled when the steps ask for more text than the corpus holds)."""
    wanted = config.heldout_tokens + config.probe_tokens + config.steps * config.chunks_per_step * config.chunk_tokens
    chunks = _public_chunks(tokenizer, wanted, config.chunk_tokens)
    generator = torch.Generator().manual_seed(order_seed)
    shuffled = [chunks[i] for i in torch.randperm(len(chunks), generator=generator).tolist()]
    heldout, rest = _take_tokens(shuffled, config.heldout_tokens)
    probe, train = _take_tokens(rest, config.probe_tokens)
    if not train:
        raise ValueError(f"the public text holds too few tokens for {config.heldout_tokens} held-out and "
                         f"{config.probe_tokens} probe tokens and any training; lower them")
    return _PublicText(train=tuple(train), probe=tuple(probe), heldout=tuple(heldout))


def _public_chunks(tokenizer, wanted: int, chunk_tokens: int) -> list[tuple[int, ...]]:
    """``wanted`` tokens of public text, or as much as the corpus holds (halving the request until it fits)."""
    while True:
        try:
            return public_token_chunks(tokenizer, wanted, chunk_tokens)
        except ValueError:
            if wanted <= chunk_tokens:
                raise
            wanted //= 2


def _take_tokens(chunks: list[tuple[int, ...]], tokens: int) -> tuple[list, list]:
    taken, count = [], 0
    while chunks and count < tokens:
        taken.append(chunks[0])
        count += len(chunks[0])
        chunks = chunks[1:]
    return taken, chunks


def _batches(chunks: Sequence[tuple[int, ...]], rows: int, pad_token_id: int, device: torch.device) -> Iterator[Batch]:
    for start in range(0, len(chunks), rows):
        examples = [TokenizedExample(input_ids=c, labels=c, full_length=len(c)) for c in chunks[start:start + rows]]
        yield collate(examples, pad_token_id).to(device)


class _LinearReader:
    """The trunk owner's linear reading of the private Bottom: a ridge map from the Bottom's own output on
    the probe text to the tokens' input embeddings, refit as the Bottom changes."""

    def __init__(self, probe: list[Batch], embeddings: torch.Tensor) -> None:
        self.probe = probe
        self.embeddings = embeddings  # (vocab, hidden)
        self.map: attacks.InversionMap | None = None

    @torch.no_grad()
    def refit(self, bottom: nn.Module) -> None:
        states, tokens = [], []
        for batch in self.probe:
            real = batch.attention_mask.bool()
            states.append(bottom(batch.input_ids, batch.attention_mask)[real].float())  # (n, hidden)
            tokens.append(batch.input_ids[real])
        tokens = torch.cat(tokens)
        self.map = attacks.fit_inversion(torch.cat(states), self.embeddings[tokens].float())

    def penalty(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Summed cosine between the map's predictions for ``hidden`` (n, hidden) and the true embeddings."""
        predicted = self.map.predict(hidden)  # (n, embed), differentiable in hidden
        return F.cosine_similarity(predicted, self.embeddings[tokens].float(), dim=-1).sum()

    @torch.no_grad()
    def reading(self, bottom: nn.Module, batches: list[Batch]) -> float:
        """Share of the tokens of ``batches`` the map reads exactly (nearest embedding in cosine)."""
        read = total = 0
        for batch in batches:
            hidden = bottom(batch.input_ids, batch.attention_mask)  # (batch, seq, hidden)
            guesses = attacks.learned_inversion(self.map, self.embeddings, hidden, batch.attention_mask,
                                                READING_CANDIDATES)
            hits, count = attacks.recovery(guesses.tokens, batch.input_ids, batch.attention_mask)
            read, total = read + hits, total + count
        return read / max(1, total)


def _next_token_log_probs(bottom: nn.Module, top: nn.Module, trunk_pass: Callable, batch: Batch) -> torch.Tensor:
    """Log-probabilities (positions, vocab) of the next token at the batch's real positions."""
    mask = batch.attention_mask
    hidden = trunk_pass(bottom(batch.input_ids, mask), mask)  # (batch, seq, hidden)
    return top(hidden, mask).logits[mask.bool()].float().log_softmax(-1)  # (positions, vocab)


@torch.no_grad()
def _divergence(bottom: PeftModel, top: nn.Module, trunk: FrozenTrunkSessions,
                batches: list[Batch]) -> tuple[float, float]:
    """(mean KL from the public model's next-token distribution to the client's, top-1 agreement)."""
    kl = agree = positions = 0.0
    for batch in batches:
        with bottom.disable_adapter():
            teacher = _next_token_log_probs(bottom, top, trunk.evaluate, batch)
        student = _next_token_log_probs(bottom, top, trunk.evaluate, batch)
        kl += float(F.kl_div(student, teacher, log_target=True, reduction="sum"))
        agree += float((teacher.argmax(-1) == student.argmax(-1)).sum())
        positions += teacher.shape[0]
    return kl / positions, agree / positions


def _rms(param: torch.Tensor) -> float:
    return max(float(param.detach().float().pow(2).mean().sqrt()), 1e-8)


def _lora_parameters(bottom: nn.Module) -> list[nn.Parameter]:
    params = [p for name, p in bottom.named_parameters() if "lora_" in name]
    if not params:
        raise ValueError("the Bottom has no LoRA weights to distil; check the LoRA target modules")
    return params


def distil_private_bottom(bottom: PeftModel, top: nn.Module, trunk: FrozenTrunkSessions, tokenizer,
                          config: DistillConfig, secret: ClientSecret, seed: int,
                          embeddings: torch.Tensor) -> DistillReport:
    """Train ``bottom``'s LoRA (a private Bottom, its public base reachable with ``disable_adapter``) on
    public text to keep the public model's next-token distributions through ``trunk`` and ``top``
    (whose LoRA must still be zero) while a linear map refit on its own output reads the tokens worse.

    ``trunk`` is entered here (its sessions open and close around the distillation). ``embeddings``
    is the public token-embedding matrix (vocab, hidden). Only the Bottom's LoRA changes; no other
    parameter keeps a gradient, and the optimizer is dropped at the end.
    """
    started = time.perf_counter()
    device = next(bottom.parameters()).device
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    text = _public_text(tokenizer, config, secret.derive(DISTILL_ORDER, seed))
    heldout = list(_batches(text.heldout, config.rows_per_call, pad_token_id, device))
    reader = _LinearReader(list(_batches(text.probe, PROBE_ROWS, pad_token_id, device)), embeddings.detach())
    params = _lora_parameters(bottom)
    was_trainable = [p.requires_grad for p in params]
    modes = [(part, part.training) for part in (bottom, top)]
    for part, _ in modes:
        part.eval()  # no dropout: the teacher and the student see the same network
    try:
        for param in params:
            param.requires_grad_(True)
        with trunk:
            kl_before, agreement_before = _divergence(bottom, top, trunk, heldout)
            reader.refit(bottom)
            reading_before = reader.reading(bottom, heldout)
            _train(bottom, top, trunk, reader, text.train, params, config, pad_token_id, device)
            kl_after, agreement_after = _divergence(bottom, top, trunk, heldout)
        reader.refit(bottom)
        reading_after = reader.reading(bottom, heldout)
    finally:
        for param, trainable in zip(params, was_trainable, strict=True):
            param.grad = None
            param.requires_grad_(trainable)
        for part, mode in modes:
            part.train(mode)
    report = DistillReport(
        steps=config.steps, public_tokens=config.steps * config.chunks_per_step * config.chunk_tokens,
        seconds=round(time.perf_counter() - started, 1), kl_before=kl_before, kl_after=kl_after,
        agreement_before=agreement_before, agreement_after=agreement_after,
        linear_reading_before=reading_before, linear_reading_after=reading_after)
    log.info("%s", report.describe())
    return report


def _train(bottom: PeftModel, top: nn.Module, trunk: FrozenTrunkSessions, reader: _LinearReader,
           chunks: Sequence[tuple[int, ...]], params: list[nn.Parameter], config: DistillConfig,
           pad_token_id: int, device: torch.device) -> None:
    # Each LoRA tensor moves by about learning_rate times its own size per step: LoRA's A starts tens of
    # times smaller than a private Bottom's B, and one step size for both either stalls B or scrambles A.
    optimizer = torch.optim.AdamW([{"params": [param], "lr": config.learning_rate * _rms(param)} for param in params],
                                  weight_decay=0.0)
    per_step = config.chunks_per_step
    for step in range(config.steps):
        if config.adversary_weight > 0 and step % config.refit_every == 0:
            reader.refit(bottom)
        start = step * per_step
        step_chunks = [chunks[(start + i) % len(chunks)] for i in range(per_step)]
        batches = list(_batches(step_chunks, config.rows_per_call, pad_token_id, device))
        positions = sum(int(batch.attention_mask.sum()) for batch in batches)
        for batch in batches:
            _distil_call(bottom, top, trunk, reader, batch, params, config.adversary_weight / positions, positions)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _distil_call(bottom: PeftModel, top: nn.Module, trunk: FrozenTrunkSessions, reader: _LinearReader,
                 batch: Batch, params: list[nn.Parameter], adversary_share: float, positions: int) -> None:
    """One call's share of a step's loss, backward into the Bottom's LoRA gradients only."""
    mask = batch.attention_mask
    real = mask.bool()
    with torch.no_grad(), bottom.disable_adapter():
        teacher = _next_token_log_probs(bottom, top, trunk.evaluate, batch)  # (positions, vocab)
    hidden = bottom(batch.input_ids, mask)  # (batch, seq, hidden)
    student = top(trunk.forward(hidden, mask), mask).logits[real].float().log_softmax(-1)  # (positions, vocab)
    loss = F.kl_div(student, teacher, log_target=True, reduction="sum") / positions
    if adversary_share > 0:
        loss = loss + adversary_share * reader.penalty(hidden[real], batch.input_ids[real])
    loss.backward(inputs=params)  # the Top's LoRA and everything else get no gradient
    trunk.finish_call()
