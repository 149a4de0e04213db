"""Adapters on the parts, from ``peft``: settings, wrapping, and deterministic initialisation.

LoRA (with peft's DoRA and rsLoRA flags), LoHa, LoKr and IA3 adapt each linear layer on its
own, so the adapter of a layer can live in whichever process runs that layer: the three
parts each hold the adapters of their blocks and together they are one ordinary adapter.
Methods whose layers share something (one rank budget, one set of projections, a router
reading the whole model) cannot be cut that way and are refused with the reason.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftConfig, PeftModel, get_peft_model
from torch import nn

from splitcore.model.architectures import ArchitectureFamily

_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# The adapter methods a job can use, with the names people know them by.
ADAPTER_METHODS = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "ia3": "IA3"}
# peft's ``peft_type`` of each method, as written in adapter_config.json.
PEFT_TYPES = {"lora": "LORA", "loha": "LOHA", "lokr": "LOKR", "ia3": "IA3"}
# Methods peft offers that cannot be split, and why (keys as peft's PeftType values, lower-case).
UNSPLITTABLE_METHODS = {
    "adalora": "AdaLoRA shares one rank budget across all layers and moves it between them while training; "
               "the trunk's layers train in another process, so that budget cannot be split",
    "vera": "VeRA shares one pair of random projection matrices across all layers, so the parts' adapters "
            "are not independent",
    "vblora": "VB-LoRA builds every layer's adapter from one vector bank shared across all layers",
    "xlora": "X-LoRA mixes adapters with a classifier that reads the hidden states of the whole model",
    "prompt_tuning": "prompt tuning adds virtual tokens at the input instead of adapting each layer",
    "prefix_tuning": "prefix tuning adds keys and values to every layer from one shared prefix encoder",
    "p_tuning": "P-tuning adds virtual tokens from one prompt encoder instead of adapting each layer",
}
# peft draws these adapter weights at random (the others start at zero or one, or from the base weight).
_RANDOM_INIT = frozenset({
    "lora_A", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_t1", "hada_t2",
    "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
})
# The first component of every adapter weight's own name, by which it is told from the module path.
ADAPTER_WEIGHT_PREFIXES = ("lora_", "hada_", "lokr_", "ia3_")
# The MLP's output projection, as a peft pattern over module paths: IA3 scales its input (a
# "feed-forward" module) instead of its output. GPT-2 names attention's output c_proj too.
IA3_FEEDFORWARD = r".*\bmlp\.(down_proj|c_proj|fc2)"
# peft's LyCORIS methods adapt nn.Linear (and convolutions), not GPT-2's transposed Conv1D.
_LINEAR_ONLY = frozenset({"loha", "lokr"})


def method_label(method: str) -> str:
    return ADAPTER_METHODS.get(method, method)


def methods_for(family: ArchitectureFamily) -> tuple[str, ...]:
    """The adapter methods peft can apply to this family's projections."""
    return tuple(m for m in ADAPTER_METHODS if not (m in _LINEAR_ONLY and family.lora_fan_in_fan_out))


def check_method(method: object) -> str:
    """``method`` when it is one a job can use, else ValueError with what is offered (and why not, when known)."""
    if isinstance(method, str) and method in ADAPTER_METHODS:
        return method
    offered = ", ".join(ADAPTER_METHODS)
    key = method.lower().replace("-", "_") if isinstance(method, str) else None
    if key in UNSPLITTABLE_METHODS:
        raise ValueError(f"adapter method {method!r} cannot be split: {UNSPLITTABLE_METHODS[key]}; "
                         f"choose one of {offered}")
    raise ValueError(f"unknown adapter method {method!r}; choose one of {offered}")


@dataclass(frozen=True)
class LoraSettings:
    """Adapter hyper-parameters shared by the three parts.

    ``method`` is one of ``ADAPTER_METHODS``. ``target_modules`` are module names (the last
    component of the module path, e.g. ``q_proj``); empty means the family's default: every
    attention and MLP projection. ``use_dora`` and ``use_rslora`` switch on peft's DoRA and
    rank-stabilised scaling (LoRA only). LoHa and LoKr take ``r`` and ``alpha`` as LoRA does
    and ``dropout`` as their rank dropout; IA3 learns one scaling vector per module and has
    no rank, alpha or dropout (they are kept but unused).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = field(default_factory=tuple)
    use_dora: bool = False
    use_rslora: bool = False
    method: str = "lora"

    def __post_init__(self) -> None:
        check_method(self.method)
        if self.method != "lora" and (self.use_dora or self.use_rslora):
            flag = "DoRA" if self.use_dora else "rsLoRA"
            raise ValueError(f"{flag} is a LoRA option; the {method_label(self.method)} method has no such flag")
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

    @property
    def label(self) -> str:
        """E.g. "LoRA", "LoRA (DoRA, rsLoRA)", "LoKr"."""
        flags = [name for name, on in (("DoRA", self.use_dora), ("rsLoRA", self.use_rslora)) if on]
        return method_label(self.method) + (f" ({', '.join(flags)})" if flags else "")

    @property
    def has_rank(self) -> bool:
        return self.method != "ia3"

    def targets_for(self, family: ArchitectureFamily) -> tuple[str, ...]:
        return self.target_modules or family.lora_targets

    def check_family(self, family: ArchitectureFamily) -> None:
        """ValueError when peft cannot apply this method to the family's projections."""
        if self.method not in methods_for(family):
            raise ValueError(f"peft's {method_label(self.method)} adapts linear layers; the {family.name} family's "
                             "projections are transposed Conv1D layers: choose LoRA or IA3 for it")

    def peft_config(
        self,
        family: ArchitectureFamily,
        target_modules: tuple[str, ...] | None = None,
        task_type: str | None = None,
        base_model_name_or_path: str | None = None,
    ) -> PeftConfig:
        """The ``peft`` config of the method; ``task_type`` stays None for a bare part (see DESIGN.md)."""
        self.check_family(family)
        targets = sorted(target_modules or self.targets_for(family))
        common = dict(target_modules=targets, task_type=task_type, base_model_name_or_path=base_model_name_or_path)
        if self.method == "lora":
            return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                              fan_in_fan_out=family.lora_fan_in_fan_out, use_dora=self.use_dora,
                              use_rslora=self.use_rslora, bias="none", **common)
        if self.method == "ia3":
            return IA3Config(feedforward_modules=IA3_FEEDFORWARD, fan_in_fan_out=family.lora_fan_in_fan_out,
                             **common)
        config_class = LoHaConfig if self.method == "loha" else LoKrConfig
        return config_class(r=self.r, alpha=self.alpha, rank_dropout=self.dropout, module_dropout=0.0, **common)


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
                    layers: set[int] | range | None = None, where: str | None = None) -> PeftConfig:
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
    """Wrap one part with peft adapters (see ``lora_config_for``) and initialise them from ``seed``."""
    peft_part = get_peft_model(part, lora_config_for(part, family, settings))
    init_lora_weights(peft_part, seed)
    return peft_part


def _stable_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _random_weight_name(name: str, adapter_name: str) -> str | None:
    """The canonical name of a randomly initialised adapter weight of ``adapter_name``, else None.

    The canonical name is the parameter path relative to the full model without the adapter
    name (``model.layers.3.self_attn.q_proj.lora_A.weight``, ``...q_proj.hada_w1_a``): the same
    in a part, in the unsplit model and in a trunk server session.
    """
    parts = name.removeprefix("base_model.model.").split(".")
    for index, part in enumerate(parts[:-1]):
        if part in _RANDOM_INIT and parts[index + 1] == adapter_name:
            return ".".join(parts[:index + 1] + parts[index + 2:])
    return None


@torch.no_grad()
def init_lora_weights(model: nn.Module, seed: int, adapter_name: str = "default",
                      include: Callable[[str], bool] | None = None) -> None:
    """Re-draw every randomly initialised adapter weight from a generator seeded by ``seed`` and its path.

    peft draws LoRA's A (and LoHa's and LoKr's random factors) from the global RNG in module
    order, so the same adapter created as three parts in two processes or as one monolithic
    model would start differently. Seeding per path makes them start identical; the
    distribution is peft's own (Kaiming-uniform with a = sqrt(5)) and the factors peft starts
    at zero stay zero, so the adapter starts as a no-op. IA3 starts at one: nothing to draw.
    ``include`` limits the re-draw to the weights whose canonical name it accepts.
    """
    for name, param in model.named_parameters():
        canonical = _random_weight_name(name, adapter_name)
        if canonical is not None and (include is None or include(canonical)):
            generator = torch.Generator(device="cpu").manual_seed(_stable_seed(seed, canonical))
            values = torch.empty(param.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=generator)
            param.copy_(values.to(param.dtype))
