"""Qwen3: the Llama layout plus per-head RMS norms on queries and keys.

The q/k norms live inside each attention module (``self_attn.q_norm``/``k_norm``), so the
blocks apply them themselves; what crosses a cut is unchanged. ``config.layer_types`` says
which layers use a sliding window (from ``max_window_layers`` on, when
``use_sliding_window`` is set); every part builds the masks its own layers need.
"""

from __future__ import annotations

from splitcore.model.architectures.llama import LLAMA_LAYOUT, LLAMA_PROJECTIONS, LlamaFamily

QWEN3 = LlamaFamily(
    name="qwen3",
    model_types=("qwen3",),
    **LLAMA_LAYOUT,
    lora_targets=LLAMA_PROJECTIONS,
)
