"""The leakage audit: what the trunk owner could read from one run's traffic, measured here.

``audit_privacy`` tokenises a sample of the data owner's examples exactly as training
does, computes what the trunk would receive on the first step of a run (the client
Bottom's output through ``ChannelNoise.on_hidden``, and the gradient at the Top's input
through ``ChannelNoise.on_gradient``, with a fresh client secret), plays the trunk owner's
attacks against it (``attacks``, ``alignment``, and with ``AuditConfig.strong`` the
``inversion_network``) and reports the share of tokens each one reads.
It runs on the data owner's machine; nothing leaves it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from splitcore.data.examples import tokenize_examples
from splitcore.data.formats import Example
from splitcore.model.adapter_export import ADAPTER_CONFIG, load_part_adapter
from splitcore.model.lora import LoraSettings, add_lora
from splitcore.model.part_loading import ModelParts, model_parts, weight_sharing_copy
from splitcore.model.parts import Bottom, Top
from splitcore.model.split_spec import SplitSpec
from splitcore.privacy import attacks
from splitcore.privacy.client_secret import ClientSecret
from splitcore.privacy.noise import ChannelNoise
from splitcore.privacy.private_bottom import randomise_lora
from splitcore.privacy.attack_names import (  # noqa: F401 (the names are part of the audit's API)
    ALIGNED_INVERSION, ATTACK_CHANNELS, ATTACK_TITLES, EXACT_SEARCH, GRADIENT_LABELS, GRADIENT_SEARCH, GRADIENTS,
    HIDDEN_STATES, LEARNED_INVERSION, NETWORK_INVERSION, STRONG_ATTACKS, channel_rate,
)
from splitcore.privacy.alignment import AlignmentConfig, aligned_inversion
from splitcore.privacy.inversion_network import (InversionNetwork, InversionNetworkConfig, fit_inversion_network,
                                                 network_inversion, public_hidden_grid)
from splitcore.privacy.public_text import EXTENDED, public_token_chunks
from splitcore.privacy.settings import PrivacySettings
from splitcore.training.batches import Batch, MicroBatches, split_train_val

# The attacker's own randomness (its simulated noise), unrelated to the client's secret.
_ATTACKER_SEED_OFFSET = 7919


def _check_whole(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be a whole number from {low} to {high}, got {value!r}")


@dataclass(frozen=True)
class AuditConfig:
    """How much work one audit does.

    ``sample``: examples of the data owner's dataset attacked; ``max_tokens``: each is
    truncated on the right to this many tokens, as training truncates to its sequence
    length (the first tokens are enough to measure); ``candidates``: tokens per position
    the exact search tries (the learned attack's best ones; more reads more at deep cuts
    and costs proportionally); ``public_tokens``: size of the attacker's public text, also
    cut into chunks of ``max_tokens``; ``seed``: which examples are sampled and the
    attacker's own random draws. Cost grows with sample * max_tokens * candidates * Bottom
    blocks (the search), public_tokens * Bottom blocks (the fit) and candidates * Top blocks
    (the gradient search).

    ``strong``: also train the inversion network (``STRONG_ATTACKS``) on ``strong_public_tokens``
    of the extended public corpus, and let the candidate search try its candidates instead of
    the linear map's; on 2 CPU cores it takes the default model's audit from 8 s to 25 s at cut 2 + 2
    (to about 50 s at 8 + 16), so it is off by default.
    """

    sample: int = 8
    max_tokens: int = 128
    candidates: int = 16
    public_tokens: int = 8192
    seed: int = 0
    strong: bool = False
    strong_public_tokens: int = 32768

    def __post_init__(self) -> None:
        _check_whole("the audit sample", self.sample, 1, 256)
        _check_whole("the audit's tokens per example", self.max_tokens, 2, 4096)
        _check_whole("the audit's candidates per position", self.candidates, 1, 1024)
        _check_whole("the audit's public text size in tokens", self.public_tokens, 64, 100_000)
        _check_whole("the audit seed", self.seed, 0, 2**63 - 1)
        if not isinstance(self.strong, bool):
            raise ValueError(f"the audit's strong switch must be true or false, got {self.strong!r}")
        _check_whole("the strong audit's public text size in tokens", self.strong_public_tokens, 64, 1_000_000)

    def to_dict(self) -> dict:
        return {"sample": self.sample, "max_tokens": self.max_tokens, "candidates": self.candidates,
                "public_tokens": self.public_tokens, "seed": self.seed, "strong": self.strong,
                "strong_public_tokens": self.strong_public_tokens}


@dataclass(frozen=True)
class AttackResult:
    """How many of the scored tokens one attack read exactly."""

    name: str
    recovered: int
    total: int

    def __post_init__(self) -> None:
        if self.name not in ATTACK_TITLES:
            raise ValueError(f"unknown attack {self.name!r}; known: {', '.join(ATTACK_TITLES)}")
        if not 0 <= self.recovered <= self.total:
            raise ValueError(f"{self.name}: recovered {self.recovered} of {self.total} tokens is impossible")

    @property
    def rate(self) -> float:
        return self.recovered / self.total if self.total else 0.0

    @property
    def title(self) -> str:
        return ATTACK_TITLES[self.name]

    @property
    def channel(self) -> str:
        return ATTACK_CHANNELS[self.name]

    def to_dict(self) -> dict:
        return {"name": self.name, "recovered": self.recovered, "total": self.total, "rate": self.rate}

    @classmethod
    def from_dict(cls, data: dict) -> AttackResult:
        return cls(name=data["name"], recovered=int(data["recovered"]), total=int(data["total"]))


@dataclass(frozen=True)
class AuditReport:
    """The audit of one cut and one set of defenses."""

    n_bottom: int
    n_top: int
    settings: dict
    results: tuple[AttackResult, ...]
    examples: int = 0
    seconds: float = 0.0
    config: dict = field(default_factory=dict)

    @property
    def worst_rate(self) -> float:
        """The highest share of tokens any attack read: the figure that matters to the data owner."""
        return max((result.rate for result in self.results), default=0.0)

    @property
    def strong(self) -> bool:
        """Whether the strong attacks ran (older reports: they did not)."""
        return bool(self.config.get("strong", False))

    def channel_rate(self, channel: str) -> float:
        """The highest share of tokens an attack on ``channel`` (hidden states or gradients) read."""
        return channel_rate({result.name: result.rate for result in self.results}, channel)

    def result(self, name: str) -> AttackResult:
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(f"the report has no {name!r} attack")

    def to_dict(self) -> dict:
        return {
            "cut": {"n_bottom": self.n_bottom, "n_top": self.n_top},
            "settings": dict(self.settings),
            "results": [result.to_dict() for result in self.results],
            "worst_rate": self.worst_rate,
            "examples": self.examples,
            "seconds": self.seconds,
            "config": dict(self.config),
        }

    @classmethod
    def from_dict(cls, data: dict) -> AuditReport:
        try:
            return cls(
                n_bottom=int(data["cut"]["n_bottom"]), n_top=int(data["cut"]["n_top"]),
                settings=dict(data["settings"]),
                results=tuple(AttackResult.from_dict(result) for result in data["results"]),
                examples=int(data.get("examples", 0)), seconds=float(data.get("seconds", 0.0)),
                config=dict(data.get("config", {})),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not an audit report: missing or malformed {exc}") from exc

    def table(self) -> str:
        """A small text table: one row per attack, with the share of tokens it read."""
        noise = [f"hidden noise {self.settings.get('hidden_noise', 0.0):g}",
                 f"gradient noise {self.settings.get('grad_noise', 0.0):g}"]
        if self.settings.get("private_bottom"):
            noise.append(f"private Bottom {self.settings['private_bottom']:g}")
        if self.settings.get("nopeek"):
            noise.append(f"NoPeek {self.settings['nopeek']:g}")
        if self.settings.get("gradients_to_trunk") is False:
            noise.append("no gradients to the trunk")
        width = max(len(result.title) for result in self.results) if self.results else 10
        lines = [f"Leakage audit: Bottom {self.n_bottom} blocks, Top {self.n_top} blocks, {', '.join(noise)}; "
                 f"{self.examples} examples, {self.seconds:.1f} s"
                 + ("" if self.strong else "; strong attacks not run (--strong)"),
                 f"{'attack':<{width}}  {'read':>11}  {'share':>6}"]
        for result in self.results:
            lines.append(f"{result.title:<{width}}  {result.recovered:>5}/{result.total:<5}  {result.rate:>6.1%}")
        lines.append(f"{'worst case':<{width}}  {'':>11}  {self.worst_rate:>6.1%}")
        return "\n".join(lines)


def _sample_batch(tokenizer, examples: Sequence[Example], config: AuditConfig, device: torch.device) -> Batch:
    """The sampled examples, tokenised and label-masked as training does, in one padded batch on ``device``."""
    if not examples:
        raise ValueError("the dataset has no examples to audit")
    usable = split_train_val(tokenize_examples(tokenizer, examples, config.max_tokens), 0.0, config.seed).train
    batch = MicroBatches(usable, min(config.sample, len(usable)), config.seed, _pad_id(tokenizer)).batch(0)
    return Batch(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                 labels=batch.labels.to(device))


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _client_bottom(bottom: Bottom, bottom_adapter: str | os.PathLike | nn.Module | None,
                   settings: PrivacySettings, lora: LoraSettings, seed: int) -> nn.Module:
    """The Bottom the client runs: the public one, its private variant (``settings.private_bottom``,
    drawn from a fresh secret as a run draws it from its own), or the client's trained adapter."""
    if bottom_adapter is None:
        if settings.private_bottom <= 0:
            return bottom
        private = add_lora(weight_sharing_copy(bottom), bottom.family, lora, seed=seed)
        randomise_lora(private, ClientSecret.generate(), seed, settings.private_bottom)
        return private.eval()
    if isinstance(bottom_adapter, nn.Module):
        return bottom_adapter
    directory = Path(bottom_adapter)
    if not (directory / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"bottom adapter {directory} is not a PEFT adapter directory (no {ADAPTER_CONFIG})")
    # peft injects adapter layers into the modules it wraps; a weight-sharing copy keeps the caller's Bottom as it is.
    return load_part_adapter(weight_sharing_copy(bottom), directory)


def _input_embeddings(bottom: Bottom) -> torch.Tensor:
    """The token embedding matrix (vocab, hidden) the Bottom holds: public, like all base weights."""
    return bottom.backbone.get_submodule(bottom.family.embedding_attrs[0]).weight


def _has_lora(model: nn.Module) -> bool:
    """Whether peft has put adapter layers (of any method) into ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


@dataclass(frozen=True)
class _Traffic:
    """What the trunk sees of one micro-batch, and what it computes itself."""

    hidden: torch.Tensor  # (batch, seq, hidden) received from the client's Bottom
    trunk_output: torch.Tensor  # (batch, seq, hidden) the trunk's answer, the Top's input
    gradient: torch.Tensor  # (batch, seq, hidden) d loss / d Top input, as sent back


def _run_client_bottom(client_bottom: nn.Module, batch: Batch) -> torch.Tensor:
    """The client Bottom's output (batch, seq, hidden), on the batch's device whatever device the Bottom is on."""
    weight = next(client_bottom.parameters())
    hidden = client_bottom(batch.input_ids.to(weight.device), batch.attention_mask.to(weight.device))
    return hidden.to(batch.input_ids.device)


def _simulate_traffic(client_bottom: nn.Module, run_trunk, top: Top, batch: Batch,
                      channel: ChannelNoise) -> _Traffic:
    """The first step of a run: Bottom -> noise -> Trunk -> Top loss -> gradient -> noise."""
    mask = batch.attention_mask
    with torch.no_grad():
        hidden = channel.on_hidden(_run_client_bottom(client_bottom, batch), mask, step=0, micro_batch=0)
        trunk_output = run_trunk(hidden, mask)  # (batch, seq, hidden)
    with torch.enable_grad():
        top_input = trunk_output.detach().requires_grad_()
        noisy = channel.on_gradient(top_input, mask, step=0, micro_batch=0)
        loss = top(noisy, mask, labels=batch.labels, num_items_in_batch=batch.num_trained_tokens).loss
        # Only the input's gradient: the Top's parameters get no .grad.
        (gradient,) = torch.autograd.grad(loss, top_input)
    return _Traffic(hidden=hidden.detach(), trunk_output=trunk_output.detach(), gradient=gradient.detach())


@dataclass(frozen=True)
class Attacker:
    """What the trunk owner prepares before it sees any traffic: the public Bottom's states on its public
    text (blurred as the job's hidden-state noise blurs), the linear map fit on them and, for the strong
    audit, the inversion network. It depends only on the public model, the Bottom's depth, the noise
    scale and the audit config, so audits of the same (cut, noise, config) can share one."""

    public_hidden: torch.Tensor  # (n, hidden)
    public_ids: torch.Tensor  # (n,)
    inversion: attacks.InversionMap
    network: InversionNetwork | None


def prepare_attacker(tokenizer, public_bottom: Bottom, hidden_noise: float, config: AuditConfig) -> Attacker:
    generator = torch.Generator().manual_seed(config.seed + _ATTACKER_SEED_OFFSET)
    chunks = public_token_chunks(tokenizer, config.public_tokens, config.max_tokens)
    public_hidden, public_ids = attacks.public_hidden_states(public_bottom, chunks, _pad_id(tokenizer),
                                                             hidden_noise, generator)
    embeddings = _input_embeddings(public_bottom).detach()
    inversion = attacks.fit_inversion(public_hidden, embeddings[public_ids])
    network = None
    if config.strong:
        strong_chunks = public_token_chunks(tokenizer, config.strong_public_tokens, config.max_tokens, corpus=EXTENDED)
        grid = public_hidden_grid(public_bottom, strong_chunks, _pad_id(tokenizer), hidden_noise, generator)
        network = fit_inversion_network(*grid, embeddings, InversionNetworkConfig(seed=config.seed))
    return Attacker(public_hidden=public_hidden, public_ids=public_ids, inversion=inversion, network=network)


def _hidden_state_attacks(attacker: Attacker, public_bottom: Bottom, batch: Batch, received: torch.Tensor,
                          settings: PrivacySettings, config: AuditConfig) -> list[AttackResult]:
    """The attacks on the hidden states the trunk receives (``received``, (batch, seq, hidden))."""
    embeddings = _input_embeddings(public_bottom).detach()
    mask = batch.attention_mask
    learned = attacks.learned_inversion(attacker.inversion, embeddings, received, mask, config.candidates)
    aligned = aligned_inversion(public_bottom, received, mask, attacker.public_hidden, attacker.public_ids,
                                embeddings, attacker.inversion, config.candidates, AlignmentConfig(seed=config.seed))
    readings = {LEARNED_INVERSION: learned, ALIGNED_INVERSION: aligned}
    candidates = learned.candidates
    if attacker.network is not None:
        readings[NETWORK_INVERSION] = network_inversion(attacker.network, embeddings, received, mask,
                                                        config.candidates)
        candidates = readings[NETWORK_INVERSION].candidates
    readings[EXACT_SEARCH] = attacks.exact_search(public_bottom, received, mask, candidates, settings.hidden_noise)
    return [AttackResult(name, *attacks.recovery(guesses.tokens, batch.input_ids, mask))
            for name, guesses in readings.items()]


def _gradient_attacks(top: Top, batch: Batch, traffic: _Traffic, settings: PrivacySettings,
                      config: AuditConfig) -> list[AttackResult]:
    """The attacks on the gradient the client sends back (the labels: the next input tokens)."""
    targets, labelled = attacks.label_targets(batch.labels)
    if not settings.gradients_to_trunk:  # the trunk is never sent a gradient: this channel carries nothing to read
        return [AttackResult(name, 0, int(labelled.sum())) for name in (GRADIENT_LABELS, GRADIENT_SEARCH)]
    mask = batch.attention_mask
    read = attacks.gradient_labels(top, traffic.trunk_output, mask, traffic.gradient, positions=labelled,
                                   k=config.candidates)
    searched = attacks.gradient_search(top, traffic.trunk_output, mask, traffic.gradient, read.candidates, labelled)
    return [AttackResult(GRADIENT_LABELS, *attacks.recovery(read.tokens, targets, labelled)),
            AttackResult(GRADIENT_SEARCH, *attacks.recovery(searched.tokens, targets, labelled))]


def _run_attacks(attacker: Attacker, public_bottom: Bottom, top: Top, batch: Batch,
                 traffic: _Traffic, settings: PrivacySettings, config: AuditConfig) -> tuple[AttackResult, ...]:
    return (*_hidden_state_attacks(attacker, public_bottom, batch, traffic.hidden, settings, config),
            *_gradient_attacks(top, batch, traffic, settings, config))


def audit_privacy(model: PreTrainedModel | ModelParts, tokenizer, examples: Sequence[Example], settings: PrivacySettings,
                  n_bottom: int, n_top: int, config: AuditConfig = AuditConfig(),
                  bottom_adapter: str | os.PathLike | nn.Module | None = None,
                  lora: LoraSettings = LoraSettings(), attackers: dict | None = None) -> AuditReport:
    """Play the honest-but-curious trunk owner against a sample of ``examples``; report what it reads.

    ``model`` is the public base model (no LoRA in it); it is left as it was. ``n_bottom``
    / ``n_top`` are the concrete cut (resolve ``settings.bottom_layers`` None to the
    trunk's default first). The noise is ``settings``' own. ``bottom_adapter`` is the
    Bottom the client really runs, when it differs from the public one: a PEFT adapter
    directory (applied to a private copy of the Bottom) or a module called like
    ``Bottom`` (input_ids, attention_mask) -> hidden; the attacker still has only the
    public weights. Without ``bottom_adapter`` and with ``settings.private_bottom`` on, the
    client's Bottom is a private variant drawn as a run draws it, with ``lora``'s shape. The
    Top is the public one with a zero LoRA, as at the start of a run.

    ``attackers``: a dict the caller keeps between audits of the same public ``model`` (a benchmark
    auditing many settings): the attacker's preparation (``prepare_attacker``) is stored there per
    (Bottom depth, hidden-state noise, config) and reused instead of being fit again.
    """
    if not isinstance(settings, PrivacySettings):
        raise ValueError(f"settings must be PrivacySettings, got {type(settings).__name__}")
    if not isinstance(config, AuditConfig):
        raise ValueError(f"config must be an AuditConfig, got {type(config).__name__}")
    if not isinstance(model, ModelParts) and _has_lora(model):
        raise ValueError("the model to audit carries adapter layers, so it is not the public base model the trunk "
                         "owner holds; pass the base model and give the client's own Bottom as bottom_adapter")
    started = time.perf_counter()
    parts = model_parts(model)
    spec = SplitSpec(parts.family.num_layers(parts.config), n_bottom, n_top)
    public_bottom, top = parts.client_parts(spec)
    batch = _sample_batch(tokenizer, examples, config, _input_embeddings(public_bottom).device)
    modes = [(part, part.training) for part in (public_bottom, top)]
    for part, _ in modes:
        part.eval()
    try:
        channel = ChannelNoise(ClientSecret.generate(), seed=config.seed, hidden_scale=settings.hidden_noise,
                               grad_scale=settings.grad_noise)
        client_bottom = _client_bottom(public_bottom, bottom_adapter, settings, lora, config.seed)
        traffic = _simulate_traffic(client_bottom, lambda hidden, mask: parts.run_trunk(spec.trunk_layers, hidden, mask),
                                    top, batch, channel)
        key = (n_bottom, settings.hidden_noise, config)
        attacker = (attackers or {}).get(key) or prepare_attacker(tokenizer, public_bottom, settings.hidden_noise, config)
        if attackers is not None:
            attackers[key] = attacker
        results = _run_attacks(attacker, public_bottom, top, batch, traffic, settings, config)
    finally:
        for part, mode in modes:
            part.train(mode)
    return AuditReport(n_bottom=n_bottom, n_top=n_top, settings=settings.to_dict(), results=results,
                       examples=int(batch.input_ids.shape[0]), seconds=round(time.perf_counter() - started, 2),
                       config=config.to_dict())
