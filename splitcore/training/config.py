"""Hyper-parameters of a training run, validated once."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from splitcore.model.lora import LoraSettings
from splitcore.privacy.settings import PrivacySettings
from splitcore.remote.messages import OptimizerSettings
from splitcore.remote.wire import FLOAT_ENCODINGS

SCHEDULES = ("linear", "cosine")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a run computes (not where it runs).

    Exactly one of ``max_steps`` and ``epochs`` is set. An optimizer step consumes
    ``batch_size * grad_accum`` examples. ``max_grad_norm`` 0 turns clipping off.
    ``eval_every`` and ``checkpoint_every`` count optimizer steps (0: only at the end).
    ``privacy`` chooses the cut and the defenses (see ``splitcore.privacy``).
    """

    lora: LoraSettings = field(default_factory=LoraSettings)
    train_trunk_lora: bool = True
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    learning_rate: float = 2e-4
    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 512
    warmup_steps: int = 0
    schedule: str = "linear"
    max_grad_norm: float = 1.0
    seed: int = 0
    val_fraction: float = 0.0
    eval_every: int = 0
    checkpoint_every: int = 0
    wire_encoding: str = "fp32"
    privacy: PrivacySettings = field(default_factory=PrivacySettings)

    def __post_init__(self) -> None:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of max_steps and epochs")
        if self.max_steps is not None and not (_is_int(self.max_steps) and 1 <= self.max_steps <= 10_000_000):
            raise ValueError(f"max_steps must be an integer from 1 to 10000000, got {self.max_steps!r}")
        if self.epochs is not None and not (isinstance(self.epochs, (int, float)) and 0 < self.epochs <= 10_000):
            raise ValueError(f"epochs must be a number in (0, 10000], got {self.epochs!r}")
        for name, low, high in (("batch_size", 1, 4096), ("grad_accum", 1, 4096), ("seq_len", 2, 1 << 20),
                                ("warmup_steps", 0, 10_000_000), ("eval_every", 0, 10_000_000),
                                ("checkpoint_every", 0, 10_000_000), ("seed", 0, 2**63 - 1)):
            value = getattr(self, name)
            if not (_is_int(value) and low <= value <= high):
                raise ValueError(f"{name} must be an integer from {low} to {high}, got {value!r}")
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
                and 0 < self.learning_rate <= 1):
            raise ValueError(f"learning_rate must be in (0, 1], got {self.learning_rate!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not (isinstance(self.max_grad_norm, (int, float)) and math.isfinite(self.max_grad_norm)
                and self.max_grad_norm >= 0):
            raise ValueError(f"max_grad_norm must be >= 0 (0 turns clipping off), got {self.max_grad_norm!r}")
        if not (isinstance(self.val_fraction, (int, float)) and 0 <= self.val_fraction < 1):
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if not isinstance(self.privacy, PrivacySettings):
            raise ValueError(f"privacy must be PrivacySettings, got {type(self.privacy).__name__}")
        if not self.privacy.gradients_to_trunk and self.train_trunk_lora:
            raise ValueError("with no gradients sent to the trunk, its LoRA cannot learn: turn trunk LoRA off "
                             "(train_trunk_lora) or send gradients")
        if self.privacy.private_bottom and self.lora.method != "lora":
            raise ValueError(f"a private Bottom draws the Bottom's LoRA B matrices from the client's secret; it "
                             f"needs the LoRA method, not {self.lora.label}")
        if self.wire_encoding not in FLOAT_ENCODINGS:
            raise ValueError(f"wire encoding must be one of {', '.join(FLOAT_ENCODINGS)}, got {self.wire_encoding!r}")

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def total_steps(self, num_train_examples: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * num_train_examples / self.examples_per_step))

    def to_dict(self) -> dict:
        """JSON-ready, for checkpoints and ``training_args.json``."""
        data = dataclasses.asdict(self)
        data["lora"]["target_modules"] = list(self.lora.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        data = dict(data)
        lora_data = data.pop("lora", None)
        lora = LoraSettings(**{**lora_data, "target_modules": tuple(lora_data["target_modules"])}) \
            if lora_data else LoraSettings()
        optimizer = OptimizerSettings(**data.pop("optimizer")) if "optimizer" in data else OptimizerSettings()
        privacy = PrivacySettings.from_dict(data.pop("privacy", None))
        return cls(lora=lora, optimizer=optimizer, privacy=privacy, **data)

    def resume_key(self) -> dict:
        """The settings a resumed run must share with the run that wrote the checkpoint."""
        data = self.to_dict()
        for free in ("eval_every", "checkpoint_every", "wire_encoding"):
            data.pop(free)
        return data
