"""GPT-2: learned position embeddings (Bottom only), Conv1D projections."""

from __future__ import annotations

import torch
from torch import nn

from splitcore.model.architectures.base import ArchitectureFamily


class GPT2Family(ArchitectureFamily):
    def embed(self, backbone: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        hidden = backbone.wte(input_ids) + backbone.wpe(position_ids)  # (batch, seq, hidden)
        return backbone.drop(hidden)


GPT2 = GPT2Family(
    name="gpt2",
    model_types=("gpt2",),
    backbone_attr="transformer",
    layers_attr="h",
    final_norm_attr="ln_f",
    embedding_attrs=("wte", "wpe", "drop"),
    shared_attrs=(),
    lora_targets=("c_attn", "c_proj", "c_fc"),
    lora_fan_in_fan_out=True,
)
