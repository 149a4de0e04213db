"""The privacy settings of one run: where the model is cut and which defenses are on."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

MAX_NOISE = 100.0
MAX_NOPEEK = 100.0
MAX_PRIVATE_BOTTOM = 10.0
MAX_DISTILL_STEPS = 100_000


def _optional_layers(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
        raise ValueError(f"{name} must be a whole number of decoder blocks from 1 up, or empty for the trunk's "
                         f"default, got {value!r}")


@dataclass(frozen=True)
class PrivacySettings:
    """What the trunk gets to see, and how much it is blurred.

    ``bottom_layers`` / ``top_layers``: decoder blocks kept on the data owner's machine
    before and after the trunk (None: the trunk server's default cut). More Bottom blocks
    make the hidden states the trunk receives harder to invert; more Top blocks do the same
    for the gradients it receives.

    ``hidden_noise`` / ``grad_noise``: clipped Gaussian noise on the hidden states sent to
    the trunk and on the gradients sent back to it. Each position's vector is clipped to
    ``CLIP_MULTIPLE`` times the micro-batch's median position norm, then Gaussian noise
    whose norm is about ``noise`` times that median norm is added (0: off). The noise is
    drawn from the client's secret, so the trunk cannot regenerate and subtract it.

    ``nopeek``: weight of a NoPeek term in the training objective, the distance correlation
    between the Bottom's input embeddings and the hidden states it sends (0: off). It trains
    the Bottom's LoRA to move its output away from what the public Bottom would send.

    ``private_bottom``: the Bottom's LoRA starts as a secret random change of each weight, of
    this size relative to the weight's norm (0: off, LoRA starts at zero as usual), so the
    trunk owner's copy of the public Bottom no longer matches the client's.

    ``distill_bottom``: steps of distillation on public text that a fresh run gives its private
    Bottom before any of the data owner's hidden states is sent (0: off; needs ``private_bottom``):
    the Bottom learns to keep the public model's next-token predictions through the real trunk, with a
    term against a linear map fit on its own output (``splitcore.privacy.distilled_bottom``). The
    trunk receives the public text's hidden states and their gradients meanwhile.

    ``gradients_to_trunk``: False closes the gradient channel: the trunk receives hidden states
    only, never a gradient. Nothing behind the cut can then learn: the Bottom stays as it starts
    and the trunk must be frozen (no trunk LoRA); only the Top trains.
    """

    bottom_layers: int | None = None
    top_layers: int | None = None
    hidden_noise: float = 0.0
    grad_noise: float = 0.0
    nopeek: float = 0.0
    private_bottom: float = 0.0
    gradients_to_trunk: bool = True
    distill_bottom: int = 0

    def __post_init__(self) -> None:
        _optional_layers("bottom_layers", self.bottom_layers)
        _optional_layers("top_layers", self.top_layers)
        if not isinstance(self.gradients_to_trunk, bool):
            raise ValueError(f"gradients_to_trunk must be true or false, got {self.gradients_to_trunk!r}")
        for name, highest in (("hidden_noise", MAX_NOISE), ("grad_noise", MAX_NOISE), ("nopeek", MAX_NOPEEK),
                              ("private_bottom", MAX_PRIVATE_BOTTOM)):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or not 0.0 <= value <= highest):
                raise ValueError(f"{name} must be a number from 0 (off) to {highest:g}, got {value!r}")
            object.__setattr__(self, name, float(value))
        if (isinstance(self.distill_bottom, bool) or not isinstance(self.distill_bottom, int)
                or not 0 <= self.distill_bottom <= MAX_DISTILL_STEPS):
            raise ValueError(f"distill_bottom must be a whole number of distillation steps from 0 (off) to "
                             f"{MAX_DISTILL_STEPS}, got {self.distill_bottom!r}")
        if self.distill_bottom and not self.private_bottom:
            raise ValueError("distill_bottom distils a private Bottom, and private_bottom is 0: set private_bottom "
                             "above 0 (the size of the secret change to distil) or distill_bottom to 0")
        if not self.gradients_to_trunk and (self.nopeek or self.grad_noise):
            raise ValueError("with no gradients sent to the trunk, the Bottom does not train and no gradient is "
                             "blurred: NoPeek and gradient noise have nothing to act on; turn them off")

    @property
    def any_noise(self) -> bool:
        return self.hidden_noise > 0 or self.grad_noise > 0

    @property
    def needs_cut(self) -> bool:
        """Defenses that act where the model is cut (a local run has no cut)."""
        return self.any_noise or self.nopeek > 0 or self.private_bottom > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> PrivacySettings:
        if not data:
            return cls()
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown privacy setting {sorted(unknown)[0]!r}")
        return cls(**data)

    def describe(self) -> str:
        """One line for logs and pages, e.g. "8 blocks before the trunk, 16 after it; private Bottom 0.3"."""
        if self.bottom_layers is None and self.top_layers is None:
            cut = "the trunk's default cut"
        else:
            before = ("the default number of blocks" if self.bottom_layers is None
                      else f"{self.bottom_layers} block{'s' if self.bottom_layers != 1 else ''}")
            after = "the default number" if self.top_layers is None else str(self.top_layers)
            cut = f"{before} before the trunk, {after} after it"
        defenses = []
        if self.private_bottom:
            distilled = f" distilled {self.distill_bottom} steps" if self.distill_bottom else ""
            defenses.append(f"private Bottom {self.private_bottom:g}{distilled}")
        if self.nopeek:
            defenses.append(f"NoPeek weight {self.nopeek:g}")
        if self.hidden_noise:
            defenses.append(f"hidden-state noise {self.hidden_noise:g}")
        if self.grad_noise:
            defenses.append(f"gradient noise {self.grad_noise:g}")
        if not self.gradients_to_trunk:
            defenses.append("no gradients to the trunk")
        return f"{cut}; {', '.join(defenses) if defenses else 'no other defense'}"
