"""Gemma 3 text models (``Gemma3ForCausalLM``, model_type ``gemma3_text``).

Like Gemma 2 (scaled embeddings, ``1 + weight`` norms, optional final logit soft-capping),
plus q/k norms inside attention, and local and global layers rotated with different
frequencies: the one rotary module holds a set of frequencies per attention type
(``config.rope_parameters[layer_type]``), so each layer gets the cos/sin of its own type.

The vision-language ``Gemma3ForConditionalGeneration`` (model_type ``gemma3``) wraps a
text model with an image tower; it is refused with a pointer to the text model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from splitcore.model.architectures.gemma2 import GemmaFamily
from splitcore.model.architectures.llama import LLAMA_LAYOUT, LLAMA_PROJECTIONS


class Gemma3Family(GemmaFamily):
    def block_kwargs(self, backbone: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor,
                     attention_type: str) -> dict[str, Any]:
        return {"position_embeddings": backbone.rotary_emb(hidden, position_ids, attention_type)}


GEMMA3 = Gemma3Family(
    name="gemma3",
    model_types=("gemma3_text",),
    **LLAMA_LAYOUT,
    lora_targets=LLAMA_PROJECTIONS,
    refused_model_types=(
        ("gemma3", "Gemma3ForConditionalGeneration (model_type 'gemma3') is a vision-language model and cannot "
                   "be split; use a Gemma 3 text model instead: a checkpoint whose config has model_type "
                   "'gemma3_text' (loaded as Gemma3ForCausalLM), such as the 1B text-only Gemma 3"),
    ),
)
