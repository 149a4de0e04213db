"""One ordinary PEFT adapter for the whole model, from the parts' adapter weights."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import save_file

from splitcore.model.architectures import ArchitectureFamily
from splitcore.model.lora import ADAPTER_WEIGHT_PREFIXES, LoraSettings

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def part_adapter_state(peft_part: PeftModel) -> dict[str, torch.Tensor]:
    """The part's adapter weights under full-model keys (``base_model.model.model.layers.N...``)."""
    return {key: value.detach().cpu() for key, value in get_peft_model_state_dict(peft_part).items()}


def merge_adapter_states(states: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Union of the parts' adapter states; the parts own disjoint layers, so keys never clash."""
    merged: dict[str, torch.Tensor] = {}
    for state in states:
        clash = merged.keys() & state.keys()
        if clash:
            raise ValueError(f"two parts hold the same adapter weight: {sorted(clash)[0]}")
        merged.update(state)
    if not merged:
        raise ValueError("no LoRA weights to export: none of the parts has an adapter")
    return merged


def adapted_module(key: str) -> str:
    """The module path of an adapter weight's key: ``...q_proj.lora_A.weight`` -> ``...q_proj``."""
    parts = key.split(".")
    for index, part in enumerate(parts):
        if part.startswith(ADAPTER_WEIGHT_PREFIXES):
            return ".".join(parts[:index])
    raise ValueError(f"{key!r} is not an adapter weight (no component starts with {', '.join(ADAPTER_WEIGHT_PREFIXES)})")


def export_adapter(
    states: Iterable[Mapping[str, torch.Tensor]],
    out_dir: str | os.PathLike,
    family: ArchitectureFamily,
    settings: LoraSettings,
    base_model_name_or_path: str,
) -> Path:
    """Write a standard PEFT adapter directory for the unsplit model.

    It holds ``adapter_config.json`` (``task_type: CAUSAL_LM``) and
    ``adapter_model.safetensors`` and loads with
    ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out_dir)``.
    Files are written to temporary names and renamed, so a crash leaves no half file.
    """
    merged = merge_adapter_states(states)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = settings.peft_config(family, task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path)
    # Every adapted module of every part; a custom target list may name modules absent in some parts.
    config.target_modules = sorted({adapted_module(key).rsplit(".", 1)[-1] for key in merged})
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as staging:
        config.save_pretrained(staging)
        tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in merged.items()}
        save_file(tensors, os.path.join(staging, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            os.replace(os.path.join(staging, name), out / name)
    return out


def export_parts_adapter(
    peft_parts: Iterable[PeftModel],
    out_dir: str | os.PathLike,
    family: ArchitectureFamily,
    settings: LoraSettings,
    base_model_name_or_path: str,
) -> Path:
    """``export_adapter`` for parts held in this process."""
    return export_adapter(
        (part_adapter_state(p) for p in peft_parts), out_dir, family, settings, base_model_name_or_path
    )


def load_part_adapter(part: torch.nn.Module, adapter_dir: str | os.PathLike) -> PeftModel:
    """A whole-model PEFT adapter on one part: peft adds the adapter layers of the part's blocks and
    loads their weights; the weights of other parts' blocks are left out (the part lacks those modules)."""
    from peft import PeftConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    directory = Path(adapter_dir)
    if not (directory / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{directory} is not a PEFT adapter directory (no {ADAPTER_CONFIG})")
    config = PeftConfig.from_pretrained(str(directory))
    config.task_type = None  # a bare part, not a *ForCausalLM (see DESIGN.md)
    config.inference_mode = True
    peft_part = PeftModel(part, config)
    present = {name for name, _ in peft_part.named_modules()}
    weights = {key: value for key, value in load_file(str(directory / ADAPTER_WEIGHTS)).items()
               if adapted_module(key) in present}
    missing = sorted(get_peft_model_state_dict(peft_part).keys() - weights.keys())
    if missing:
        raise ValueError(f"the adapter in {directory} has no weight {missing[0]!r} for this part")
    set_peft_model_state_dict(peft_part, weights)
    return peft_part.eval()
