"""Qwen3: the Llama layout plus per-head RMS norms on queries and keys.

The q/k norms live inside each attention module (``self_attn.q_norm``/``k_norm``), so the
blocks apply them themselves; what crosses a cut is unchanged. ``config.layer_types`` says
which layers use a sliding window (from ``max_window_layers`` on, when
``use_sliding_window`` is set); every part builds the masks its own layers need.
"""

from __future__ import annotations

from splitcore.model.architectures.llama import LlamaFamily

QWEN3 = LlamaFamily(
    name="qwen3",
    model_types=("qwen3",),
    backbone_attr="model",
    layers_attr="layers",
    final_norm_attr="norm",
    embedding_attrs=("embed_tokens",),
    shared_attrs=("rotary_emb",),
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)
