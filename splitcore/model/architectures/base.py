"""What the splitter needs to know about one family of decoder-only models.

A family names where the pieces live inside the Hugging Face model (so every part
keeps the full model's module paths), how to feed a decoder block, and what the full
model's forward does outside its blocks (embedding scale, logit soft-capping). Adding a
family means adding one subclass (or instance) and registering it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


@dataclass(frozen=True)
class ArchitectureFamily:
    """Module layout and calling convention shared by the models of one family.

    Attributes:
        name: short family name shown in messages ("gpt2", "llama").
        model_types: the ``config.model_type`` values this family handles.
        backbone_attr: attribute of ``*ForCausalLM`` holding the decoder ("transformer", "model").
        layers_attr: attribute of the backbone holding the decoder blocks ("h", "layers").
        final_norm_attr: attribute of the backbone holding the final norm ("ln_f", "norm").
        embedding_attrs: backbone modules only Bottom needs (token and position embeddings).
        shared_attrs: weightless backbone helpers every part needs (rotary embeddings).
        lora_targets: default LoRA target modules: every attention and MLP projection.
        lora_fan_in_fan_out: True when the projections store weights transposed (GPT-2 Conv1D).
        refused_model_types: ``(model_type, what to use instead)`` for related models this family
            cannot split (e.g. a vision-language wrapper around a supported text model).
    """

    name: str
    model_types: tuple[str, ...]
    backbone_attr: str
    layers_attr: str
    final_norm_attr: str
    embedding_attrs: tuple[str, ...]
    shared_attrs: tuple[str, ...]
    lora_targets: tuple[str, ...]
    lora_fan_in_fan_out: bool = False
    refused_model_types: tuple[tuple[str, str], ...] = ()

    def num_layers(self, config: PretrainedConfig) -> int:
        return int(config.num_hidden_layers)

    def check_config(self, config: PretrainedConfig) -> None:
        """ValueError for a config of this family that the parts cannot reproduce."""

    def embed(self, backbone: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (batch, seq) -> first hidden states (batch, seq, hidden)."""
        raise NotImplementedError

    def block_kwargs(self, backbone: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor,
                     attention_type: str) -> dict[str, Any]:
        """Extra keyword arguments the decoder blocks of one attention type take (e.g. rotary cos/sin).

        ``attention_type`` is FULL_ATTENTION or SLIDING_ATTENTION: some families rotate local
        and global layers with different frequencies.
        """
        return {}

    def logits(self, config: PretrainedConfig, logits: torch.Tensor) -> torch.Tensor:
        """What ``*ForCausalLM.forward`` does to the LM head's output (batch, seq, vocab); default: nothing."""
        return logits

    def norm_gain(self, norm: nn.Module) -> torch.Tensor | None:
        """The per-channel scale a norm applies after normalising (its ``weight``), or None if it has none."""
        return getattr(norm, "weight", None)

    def layer_attention_types(self, config: PretrainedConfig) -> list[str]:
        """The attention kind of each layer, indexed by global layer number."""
        layer_types = getattr(config, "layer_types", None)
        if layer_types:
            return list(layer_types)
        kind = SLIDING_ATTENTION if getattr(config, "sliding_window", None) else FULL_ATTENTION
        return [kind] * self.num_layers(config)
