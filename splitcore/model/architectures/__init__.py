"""Registry of supported model families, keyed by ``config.model_type``."""

from __future__ import annotations

from transformers import PretrainedConfig

from splitcore.model.architectures.base import FULL_ATTENTION, SLIDING_ATTENTION, ArchitectureFamily
from splitcore.model.architectures.gemma2 import GEMMA2
from splitcore.model.architectures.gemma3 import GEMMA3
from splitcore.model.architectures.gpt2 import GPT2
from splitcore.model.architectures.llama import LLAMA
from splitcore.model.architectures.phi3 import PHI3
from splitcore.model.architectures.qwen3 import QWEN3

FAMILIES: tuple[ArchitectureFamily, ...] = (GPT2, LLAMA, QWEN3, GEMMA2, GEMMA3, PHI3)

_BY_MODEL_TYPE: dict[str, ArchitectureFamily] = {
    model_type: family for family in FAMILIES for model_type in family.model_types
}
# Related model types that look supported but are not, with what to use instead.
_REFUSED: dict[str, str] = {
    model_type: advice for family in FAMILIES for model_type, advice in family.refused_model_types
}


def supported_families_text() -> str:
    """E.g. "gpt2 (gpt2), llama (llama, mistral, qwen2)", for error messages."""
    return ", ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES)


def family_for(config: PretrainedConfig) -> ArchitectureFamily:
    """The family that knows how to split a model with this config, or ValueError."""
    model_type = getattr(config, "model_type", None)
    if model_type in _REFUSED:
        raise ValueError(f"unsupported architecture {model_type!r}: {_REFUSED[model_type]}")
    family = _BY_MODEL_TYPE.get(model_type)
    if family is None:
        raise ValueError(
            f"unsupported architecture {model_type!r}: supported model families are "
            f"{supported_families_text()}"
        )
    family.check_config(config)
    return family


__all__ = [
    "FAMILIES",
    "FULL_ATTENTION",
    "SLIDING_ATTENTION",
    "ArchitectureFamily",
    "family_for",
    "supported_families_text",
]
