"""LoRA on the parts, from ``peft``: settings, wrapping, and deterministic initialisation."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from splitcore.model.architectures import ArchitectureFamily

_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters shared by the three parts.

    ``target_modules`` are module names (the last component of the module path, e.g.
    ``q_proj``); empty means the family's default: every attention and MLP projection.
    ``use_dora`` and ``use_rslora`` switch on peft's DoRA and rank-stabilised scaling.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = field(default_factory=tuple)
    use_dora: bool = False
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or not 1 <= self.r <= 4096:
            raise ValueError(f"LoRA rank r must be an integer between 1 and 4096, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        for name in self.target_modules:
            if not isinstance(name, str) or not _MODULE_NAME.match(name):
                raise ValueError(
                    f"LoRA target module {name!r} is not a module name (letters, digits and underscores, "
                    "e.g. 'q_proj')"
                )

    def targets_for(self, family: ArchitectureFamily) -> tuple[str, ...]:
        return self.target_modules or family.lora_targets

    def peft_config(
        self,
        family: ArchitectureFamily,
        target_modules: tuple[str, ...] | None = None,
        task_type: str | None = None,
        base_model_name_or_path: str | None = None,
    ) -> LoraConfig:
        """The ``peft`` LoraConfig; ``task_type`` stays None for a bare part (see DESIGN.md)."""
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=sorted(target_modules or self.targets_for(family)),
            fan_in_fan_out=family.lora_fan_in_fan_out,
            use_dora=self.use_dora,
            use_rslora=self.use_rslora,
            bias="none",
            task_type=task_type,
            base_model_name_or_path=base_model_name_or_path,
        )


def present_targets(module: nn.Module, targets: tuple[str, ...]) -> tuple[str, ...]:
    """The targets that name at least one submodule of ``module``."""
    names = {name.rsplit(".", 1)[-1] for name, _ in module.named_modules()}
    return tuple(t for t in targets if t in names)


def modules_in_layers(module: nn.Module, family: ArchitectureFamily, targets: tuple[str, ...],
                      layers: set[int] | range) -> tuple[str, ...]:
    """Full paths of the ``targets`` modules inside decoder blocks ``layers``, as peft target names.

    A trunk session's adapter, or a local run's adapter without trunk LoRA, covers only
    these blocks; other blocks of the same model stay without this adapter.
    """
    prefix = f"{family.backbone_attr}.{family.layers_attr}."
    wanted = set(layers)
    names = []
    for name, _ in module.named_modules():
        if name.startswith(prefix) and name.rsplit(".", 1)[-1] in targets:
            if int(name[len(prefix):].split(".", 1)[0]) in wanted:
                names.append(name)
    return tuple(names)


def lora_config_for(module: nn.Module, family: ArchitectureFamily, settings: LoraSettings,
                    layers: set[int] | range | None = None, where: str | None = None) -> LoraConfig:
    """The peft config of ``settings`` on ``module``: the targets it has (inside decoder blocks
    ``layers`` only, when given). Targets missing from it (e.g. ``lm_head`` in the Trunk) are
    skipped; none at all is a ValueError that names ``where`` (default: the module's class)."""
    wanted = settings.targets_for(family)
    targets = present_targets(module, wanted)
    if layers is not None:
        targets = modules_in_layers(module, family, targets, layers)
    if not targets:
        raise ValueError(
            f"none of the LoRA target modules {', '.join(wanted)} exist in {where or type(module).__name__}; "
            f"the {family.name} family's projections are {', '.join(family.lora_targets)}"
        )
    return settings.peft_config(family, tuple(targets))


def add_lora(part: nn.Module, family: ArchitectureFamily, settings: LoraSettings, seed: int = 0) -> PeftModel:
    """Wrap one part with peft LoRA adapters (see ``lora_config_for``) and initialise them from ``seed``."""
    peft_part = get_peft_model(part, lora_config_for(part, family, settings))
    init_lora_weights(peft_part, seed)
    return peft_part


def _stable_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _canonical_name(name: str, adapter_name: str) -> str:
    """Parameter path relative to the full model without the adapter name: the same in a
    part, in the unsplit model and in a trunk server session."""
    return name.removeprefix("base_model.model.").replace(f".lora_A.{adapter_name}.", ".lora_A.")


@torch.no_grad()
def init_lora_weights(model: nn.Module, seed: int, adapter_name: str = "default",
                      include: Callable[[str], bool] | None = None) -> None:
    """Re-draw every LoRA A matrix from a generator seeded by ``seed`` and the module path.

    peft draws A from the global RNG in module order, so the same adapter created as
    three parts in two processes or as one monolithic model would start differently.
    Seeding per path makes them start identical; the distribution is peft's own
    (Kaiming-uniform with a = sqrt(5)) and B stays zero, so the adapter starts as a no-op.
    ``include`` limits the re-draw to the matrices whose canonical name it accepts.
    """
    marker = f".lora_A.{adapter_name}."
    for name, param in model.named_parameters():
        if marker in name and (include is None or include(_canonical_name(name, adapter_name))):
            generator = torch.Generator(device="cpu").manual_seed(
                _stable_seed(seed, _canonical_name(name, adapter_name))
            )
            values = torch.empty(param.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=generator)
            param.copy_(values.to(param.dtype))
