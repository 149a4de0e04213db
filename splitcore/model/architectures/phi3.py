"""Phi-3: the Llama layout with fused projections.

Queries, keys and values come from one ``qkv_proj`` and the MLP's gate and up projections
from one ``gate_up_proj``, so those are the LoRA targets. Partial rotary dimensions and
LongRoPE scaling happen inside the shared rotary module and the attention, from the
position ids every part computes. Phi-3 has no ``layer_types``: with ``sliding_window``
set, every layer uses it.
"""

from __future__ import annotations

from splitcore.model.architectures.llama import LLAMA_LAYOUT, LlamaFamily

PHI3 = LlamaFamily(
    name="phi3",
    model_types=("phi3",),
    **LLAMA_LAYOUT,
    lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
)
