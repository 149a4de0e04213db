"""Conversions between splitcore settings and the trunk protocol's messages."""

from __future__ import annotations

from dataclasses import dataclass

from splitcore.model.lora import LoraSettings
from splitcore.remote.proto import trunk_pb2 as pb


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW hyper-parameters other than the learning rate (sent per step)."""

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"AdamW betas must be in [0, 1), got ({self.beta1}, {self.beta2})")
        if not self.eps > 0:
            raise ValueError(f"AdamW eps must be positive, got {self.eps}")
        if not 0.0 <= self.weight_decay <= 1.0:
            raise ValueError(f"weight_decay must be in [0, 1], got {self.weight_decay}")


def lora_to_proto(settings: LoraSettings, seed: int) -> pb.LoraSpec:
    return pb.LoraSpec(r=settings.r, alpha=settings.alpha, dropout=settings.dropout,
                       target_modules=list(settings.target_modules), use_dora=settings.use_dora,
                       use_rslora=settings.use_rslora, seed=seed, method=settings.method)


def lora_from_proto(spec: pb.LoraSpec) -> tuple[LoraSettings, int]:
    """ValueError (from LoraSettings) when the spec is invalid."""
    settings = LoraSettings(r=int(spec.r), alpha=float(spec.alpha), dropout=float(spec.dropout),
                            target_modules=tuple(spec.target_modules), use_dora=spec.use_dora,
                            use_rslora=spec.use_rslora, method=spec.method or "lora")
    return settings, int(spec.seed)


def optimizer_to_proto(settings: OptimizerSettings) -> pb.OptimizerSpec:
    return pb.OptimizerSpec(beta1=settings.beta1, beta2=settings.beta2, eps=settings.eps,
                            weight_decay=settings.weight_decay)


def optimizer_from_proto(spec: pb.OptimizerSpec) -> OptimizerSettings:
    if spec.ByteSize() == 0:
        return OptimizerSettings()
    return OptimizerSettings(beta1=spec.beta1, beta2=spec.beta2, eps=spec.eps, weight_decay=spec.weight_decay)
