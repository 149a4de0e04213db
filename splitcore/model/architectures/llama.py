"""The Llama layout, shared by Llama, Mistral, Qwen2 and SmolLM2.

Rotary position embeddings have no weights, so every part carries the rotary
module and computes cos/sin from the position ids itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from splitcore.model.architectures.base import ArchitectureFamily


class LlamaFamily(ArchitectureFamily):
    def embed(self, backbone: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return backbone.embed_tokens(input_ids)  # (batch, seq, hidden)

    def block_kwargs(self, backbone: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor,
                     attention_type: str) -> dict[str, Any]:
        # One set of rotary frequencies for every layer, local or global.
        return {"position_embeddings": backbone.rotary_emb(hidden, position_ids=position_ids)}


# Where the pieces live in every model of the Llama layout (Qwen3, Gemma and Phi-3 too).
LLAMA_LAYOUT = dict(
    backbone_attr="model",
    layers_attr="layers",
    final_norm_attr="norm",
    embedding_attrs=("embed_tokens",),
    shared_attrs=("rotary_emb",),
)
# Every attention and MLP projection, unfused.
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

LLAMA = LlamaFamily(name="llama", model_types=("llama", "mistral", "qwen2"), lora_targets=LLAMA_PROJECTIONS,
                    **LLAMA_LAYOUT)
