"""The trunk as seen from the data owner: an autograd seam and a compatibility check.

``RemoteTrunk.apply(hidden, mask, link, step, micro)`` runs the trunk's Forward RPC and,
when autograd reaches it, the Backward RPC: the Bottom and Top parts train with
ordinary ``loss.backward()`` as if the trunk were local.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from splitcore.model.architectures import ArchitectureFamily
from splitcore.model.fingerprint import weights_fingerprint
from splitcore.model.lora import method_label
from splitcore.model.split_spec import CutBounds, SplitSpec
from splitcore.remote.client import TrunkClient
from splitcore.remote.proto import trunk_pb2 as pb


@dataclass
class TrunkLink:
    """A training session's client, the blocks it runs, its lease and what its last Backward reported."""

    client: TrunkClient
    layers: range = range(0)
    lease_s: float = 0.0
    grad_sq_norm: float = 0.0


class RemoteTrunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, attention_mask: torch.Tensor, link: TrunkLink, step: int,
                micro_batch: int) -> torch.Tensor:
        ctx.link, ctx.step, ctx.micro_batch = link, step, micro_batch
        ctx.save_for_backward(hidden, attention_mask)
        return link.client.forward(step, micro_batch, hidden.detach(), attention_mask)  # (batch, seq, hidden)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        hidden, attention_mask = ctx.saved_tensors
        grad_input, trunk_sq = ctx.link.client.backward(ctx.step, ctx.micro_batch, grad_output.contiguous(),
                                                        hidden.detach(), attention_mask)
        # The trunk reports the squared norm of its gradients accumulated so far in this step.
        ctx.link.grad_sq_norm = trunk_sq
        return grad_input, None, None, None, None


def spec_from_info(info: pb.InfoResponse) -> SplitSpec:
    """The trunk's default split: its default layer range fixes the Bottom and Top sizes."""
    return choose_split(info)


def cut_bounds(info: pb.InfoResponse) -> CutBounds:
    """The cuts a trunk allows, from its Info (a trunk from before per-session ranges: its default only)."""
    return CutBounds(num_layers=info.num_layers, default=range(info.trunk_start, info.trunk_end),
                     lowest=info.min_trunk_start or info.trunk_start, highest=info.max_trunk_end or info.trunk_end)


def choose_split(info: pb.InfoResponse, n_bottom: int | None = None, n_top: int | None = None) -> SplitSpec:
    """The cut a session asks for (None: the trunk's default on that side), within the trunk's bounds.

    ValueError, before any session opens, when the trunk's operator does not allow that cut.
    """
    bounds = cut_bounds(info)
    spec = bounds.split(n_bottom, n_top)
    if not bounds.allows(spec.trunk_layers):
        raise ValueError(
            f"the trunk ({info.model_id!r}) lets sessions run layers within {bounds.lowest}-{bounds.highest - 1} "
            f"of {info.num_layers}: keep at least {bounds.lowest} blocks on this machine before it and "
            f"{info.num_layers - bounds.highest} after it; this run keeps {spec.n_bottom} before and "
            f"{spec.n_top} after. Choose a cut within those bounds, or a trunk whose operator allows it")
    return spec


def check_trunk_serves(info: pb.InfoResponse, config: PretrainedConfig, family: ArchitectureFamily,
                       trunk_part: torch.nn.Module | None = None, trunk_fingerprint: str | None = None) -> None:
    """ValueError unless the trunk runs the same model as ``config`` (and ``trunk_part``'s weights,
    or the weights whose ``weights_fingerprint`` is ``trunk_fingerprint``).

    Compare weights with the ``info`` of the session's own range (an OpenSession reply), or
    with a plain Info when ``trunk_part`` is cut at the trunk's default range.
    """
    num_layers = family.num_layers(config)
    where = f"the trunk ({info.model_id!r})"
    if info.model_type != config.model_type:
        raise ValueError(f"{where} serves a {info.model_type} model; this model is {config.model_type}")
    if info.num_layers != num_layers or info.hidden_size != config.hidden_size:
        raise ValueError(f"{where} serves a model with {info.num_layers} layers and hidden size {info.hidden_size}; "
                         f"this model has {num_layers} layers and hidden size {config.hidden_size}")
    if trunk_part is not None:
        trunk_fingerprint = weights_fingerprint(trunk_part)
    if trunk_fingerprint is not None and info.weights_fingerprint:
        if trunk_fingerprint != info.weights_fingerprint:
            raise ValueError(f"{where} serves layers {info.trunk_start}-{info.trunk_end - 1} with different weights "
                             "than this model's; use the same base model on both sides")


@dataclass(frozen=True)
class SessionNeeds:
    """What a run (or a generation) will ask of a trunk session, to hold against the trunk's budgets."""

    batch_size: int = 1
    seq_len: int = 0  # 0: not known in advance
    micro_batches: int = 1
    lora_rank: int | None = None  # None: no trunk LoRA (or a method without a rank)
    adapter_method: str | None = None  # None: no trunk adapter

    @classmethod
    def of(cls, config) -> SessionNeeds:
        """The needs of a run with this ``TrainConfig``."""
        trunk = config.train_trunk_lora
        return cls(batch_size=config.batch_size, seq_len=config.seq_len, micro_batches=config.grad_accum,
                   lora_rank=config.lora.r if trunk and config.lora.has_rank else None,
                   adapter_method=config.lora.method if trunk else None)

    def problems(self, info: pb.InfoResponse) -> dict[str, str]:
        """What these needs ask beyond the budgets in ``info`` (a budget it does not report: none), by
        what to change: "micro_batches", "tokens", "positions", "lora_rank" or "adapter_method"."""
        problems = {}
        if info.max_micro_batches and self.micro_batches > info.max_micro_batches:
            problems["micro_batches"] = (f"{self.micro_batches} micro-batches per step (gradient accumulation); "
                                         f"it allows {info.max_micro_batches}")
        tokens = self.batch_size * self.seq_len
        if info.max_tokens_per_request and tokens > info.max_tokens_per_request:
            problems["tokens"] = (f"micro-batches of up to {self.batch_size} x {self.seq_len} = {tokens} tokens; it "
                                  f"allows {info.max_tokens_per_request} per call (lower the batch size or the "
                                  "sequence length)")
        if info.max_positions and self.seq_len > info.max_positions:
            problems["positions"] = f"sequences of {self.seq_len} tokens; the model has {info.max_positions} positions"
        if info.max_lora_rank and self.lora_rank is not None and self.lora_rank > info.max_lora_rank:
            problems["lora_rank"] = f"a trunk LoRA of rank {self.lora_rank}; it allows rank {info.max_lora_rank}"
        served = tuple(info.adapter_methods) or ("lora",)  # a server older than the field serves LoRA only
        if self.adapter_method is not None and self.adapter_method not in served:
            problems["adapter_method"] = (f"a {method_label(self.adapter_method)} adapter on the trunk; it serves "
                                          f"{', '.join(method_label(m) for m in served)} adapters")
        return problems


def check_budgets(info: pb.InfoResponse, needs: SessionNeeds) -> None:
    """ValueError, before any session opens, when the run would exceed one of the trunk's budgets."""
    problems = needs.problems(info)
    if problems:
        raise ValueError(f"the trunk ({info.model_id!r}) would refuse this run: " + "; ".join(problems.values()))
