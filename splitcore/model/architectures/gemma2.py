"""Gemma 2: the Llama module layout with Gemma's extras outside the blocks.

* Token embeddings are scaled by ``sqrt(hidden_size)``: ``embed_tokens`` is a scaled
  embedding module that multiplies in the weights' dtype, so Bottom gets it for free.
* ``*ForCausalLM.forward`` soft-caps the LM head's output, ``cap * tanh(logits / cap)``
  with ``config.final_logit_softcapping``: Top does the same through ``logits``.
* Norms scale by ``1 + weight`` (the stored weight starts at zero): ``norm_gain`` says so.

Attention soft-capping, ``query_pre_attn_scalar``, the four norms per block and the
alternating sliding/full layers (``config.layer_types``) all live inside the blocks or in
the masks every part builds, so nothing else is needed.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from splitcore.model.architectures.llama import LLAMA_LAYOUT, LLAMA_PROJECTIONS, LlamaFamily


class GemmaFamily(LlamaFamily):
    """What Gemma 2 and Gemma 3 text models do outside their decoder blocks."""

    def check_config(self, config: PretrainedConfig) -> None:
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError(
                f"this {config.model_type} config uses bidirectional attention (an embedding model, not a "
                "causal LM); only causal language models can be split"
            )

    def logits(self, config: PretrainedConfig, logits: torch.Tensor) -> torch.Tensor:
        cap = getattr(config, "final_logit_softcapping", None)
        if cap is None:
            return logits
        return torch.tanh(logits / cap) * cap  # (batch, seq, vocab)

    def norm_gain(self, norm: nn.Module) -> torch.Tensor | None:
        weight = getattr(norm, "weight", None)
        return None if weight is None else 1.0 + weight


GEMMA2 = GemmaFamily(
    name="gemma2",
    model_types=("gemma2",),
    **LLAMA_LAYOUT,
    lora_targets=LLAMA_PROJECTIONS,
)
