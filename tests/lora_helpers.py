"""LoRA weights for tests: parameter names by full-model path, B matrices that are not zero, trained-looking parts."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from splitcore import add_lora, family_for, split_model


def canonical(name: str) -> str:
    return name.removeprefix("base_model.model.")


def randomise_lora_b(model: torch.nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """Give every B matrix non-zero values so gradients reach A; returns them by full-model path."""
    generator = torch.Generator().manual_seed(seed)
    values = {}
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
                values[canonical(name)] = param.detach().clone()
    return values


def trained_parts(model_dir, settings, seed=0):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    family = family_for(model.config)
    parts = [add_lora(p, family, settings, seed=seed) for p in split_model(model, 2, 2)]
    for index, part in enumerate(parts):
        randomise_lora_b(part, seed=10 + index)
        part.eval()
    return family, parts
