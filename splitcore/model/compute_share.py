"""How a cut splits the compute of a training step between the user's workers and the trunk.

Every cut is also a split of work: the client runs the Bottom's and the Top's blocks and the LM
head, the trunk runs the blocks between. The share counted here is the matmul work per token
(multiply-accumulates, MACs) of a forward pass, read from the model's config:

* each decoder block: the attention projections (queries at ``heads × head_dim``, keys and values at
  the grouped-query width ``kv_heads × head_dim``, the output projection), the attention scores
  (``Q·Kᵀ`` and the weighted sum of values, over the keys a token attends to at ``context`` tokens per
  sequence: on average ``(context + 1) / 2`` with a causal mask, fewer on sliding-window layers),
  and the MLP (three matrices when gated, two when not);
* the LM head: ``hidden × vocab``, always on the client.

Norms, activations, the softmax, rotary embeddings and the embedding lookup are not matmuls and are
left out (a few percent of the time at most); so are the LoRA matrices (rank ≪ hidden). The backward
pass of a LoRA step sends an input gradient back through every frozen projection, which costs what
its forward did, so the share of the forward's work is the share of the whole step to within a few
percent (the trunk's share grows slightly when it also trains its own LoRA; it does no backward at all
when gradients are not sent to it).

On the default model (SmolLM2-135M-Instruct: 30 blocks, hidden 576, 9 query and 3 key/value heads
of 64, MLP 1536, vocabulary 49,152) a block costs 3.54M MACs per token in its projections plus 0.15M
in its scores at 256 tokens of context, and the LM head 28.3M, about 20% of a step. The client does
about 31% of a step at Bottom 2 + Top 2 and 84% at Bottom 8 + Top 16. Counting the projections alone
gives 32% and 84% (the head is then 21%); the scores add the same to every block, so they move work
to whichever side runs more blocks, and more so at longer contexts (28% and 83% at 2,048 tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from splitcore.model.architectures import SLIDING_ATTENTION, family_for
from splitcore.model.split_spec import SplitSpec

# Tokens per sequence the attention scores are counted at: the sequence length the measured privacy
# settings were trained at (splitcore/privacy/measured_tradeoff.json); the share moves by about a point
# between 256 and 512.
DEFAULT_CONTEXT = 256


@dataclass(frozen=True)
class BlockShape:
    """The widths of one decoder block's matmuls.

    Attributes:
        hidden: the residual stream's width.
        q_width: queries (and the attention output): ``heads × head_dim``.
        kv_width: keys and values each: ``kv_heads × head_dim`` (smaller than ``q_width`` with grouped queries).
        mlp_width: the MLP's inner width.
        gated_mlp: True for gate, up and down projections (SwiGLU, GeGLU); False for up and down (GPT-2).
    """

    hidden: int
    q_width: int
    kv_width: int
    mlp_width: int
    gated_mlp: bool

    def __post_init__(self) -> None:
        for name in ("hidden", "q_width", "kv_width", "mlp_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"a block's {name} must be a positive integer, got {value!r}")

    def projection_macs(self) -> int:
        """Multiply-accumulates per token of the attention projections and the MLP."""
        attention = self.hidden * (self.q_width + 2 * self.kv_width) + self.q_width * self.hidden
        mlp = (3 if self.gated_mlp else 2) * self.hidden * self.mlp_width
        return attention + mlp

    def score_macs(self, attended: float) -> float:
        """Multiply-accumulates per token of ``Q·Kᵀ`` and of the weighted sum of values over ``attended`` keys."""
        return 2 * self.q_width * attended


def _head_dim(config: PretrainedConfig, heads: int) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // heads)


def _decoder_shape(config: PretrainedConfig) -> BlockShape:
    """Llama, Mistral, Qwen2/3, Gemma 2/3 and Phi-3 (whose fused ``qkv_proj``/``gate_up_proj`` are the same
    matrices side by side)."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = _head_dim(config, heads)
    return BlockShape(hidden=int(config.hidden_size), q_width=heads * head_dim, kv_width=kv_heads * head_dim,
                      mlp_width=int(config.intermediate_size), gated_mlp=True)


def _gpt2_shape(config: PretrainedConfig) -> BlockShape:
    """GPT-2: one ``c_attn`` of three full-width projections, a plain MLP of ``n_inner`` (default 4 × hidden)."""
    hidden = int(config.hidden_size)
    return BlockShape(hidden=hidden, q_width=hidden, kv_width=hidden,
                      mlp_width=int(getattr(config, "n_inner", None) or 4 * hidden), gated_mlp=False)


# Model family (splitcore.model.architectures) -> how its config spells a block's widths.
SHAPE_READERS: dict[str, Callable[[PretrainedConfig], BlockShape]] = {
    "gpt2": _gpt2_shape,
    "llama": _decoder_shape,
    "qwen3": _decoder_shape,
    "gemma2": _decoder_shape,
    "gemma3": _decoder_shape,
    "phi3": _decoder_shape,
}


def attended_keys(context: int, window: int | None) -> float:
    """The keys a token attends to on average in a causal sequence of ``context`` tokens (token ``i``, from
    1, sees ``min(i, window)``)."""
    if window is None or window >= context:
        return (context + 1) / 2
    return (window * (window + 1) / 2 + (context - window) * window) / context


@dataclass(frozen=True)
class ComputeShare:
    """What a cut leaves on each side: blocks, and the client's share of a step's matmul work."""

    n_bottom: int
    n_top: int
    total_blocks: int
    client_share: float  # (Bottom + Top blocks + LM head) / (every block + LM head), from 0 to 1

    @property
    def client_blocks(self) -> int:
        return self.n_bottom + self.n_top

    @property
    def trunk_blocks(self) -> int:
        return self.total_blocks - self.client_blocks

    @property
    def percent(self) -> str:
        """The client's share in whole percent, as every page writes it ("32%")."""
        return f"{self.client_share:.0%}"

    def describe(self) -> str:
        """E.g. "your workers run 4 of 30 blocks and the LM head (32% of a step's compute); the trunk runs 26"."""
        return (f"your workers run {self.client_blocks} of {self.total_blocks} blocks and the LM head "
                f"({self.percent} of a step's compute); the trunk runs {self.trunk_blocks}")

    def to_dict(self) -> dict[str, Any]:
        return {"client_blocks": self.client_blocks, "trunk_blocks": self.trunk_blocks,
                "total_blocks": self.total_blocks, "client_share": self.client_share, "description": self.describe()}


@dataclass(frozen=True)
class ModelCompute:
    """The matmul work per token of each decoder block (by global index) and of the LM head, at ``context``
    tokens per sequence, in multiply-accumulates."""

    block_macs: tuple[float, ...]
    head_macs: int
    context: int

    @property
    def total_blocks(self) -> int:
        return len(self.block_macs)

    def share(self, n_bottom: int, n_top: int) -> ComputeShare:
        """The split of work at a cut keeping ``n_bottom`` blocks before the trunk and ``n_top`` after it;
        ValueError (from SplitSpec) for a cut that leaves a part without a block."""
        spec = SplitSpec(num_layers=self.total_blocks, n_bottom=n_bottom, n_top=n_top)
        client = sum(self.block_macs[i] for i in (*spec.bottom_layers, *spec.top_layers)) + self.head_macs
        total = sum(self.block_macs) + self.head_macs
        return ComputeShare(n_bottom=n_bottom, n_top=n_top, total_blocks=self.total_blocks,
                            client_share=client / total)

    def to_dict(self) -> dict[str, Any]:
        """For page scripts that recompute the share as a cut changes."""
        return {"block_macs": list(self.block_macs), "head_macs": self.head_macs, "context": self.context}


def as_config(config: PretrainedConfig | Mapping[str, Any]) -> PretrainedConfig:
    """A transformers config from a config object or a config.json dict (with its ``model_type``)."""
    if isinstance(config, PretrainedConfig):
        return config
    if not isinstance(config, Mapping):
        raise ValueError(f"expected a transformers config or a config.json dict, got {type(config).__name__}")
    values = dict(config)
    model_type = values.pop("model_type", None)
    if not model_type:
        raise ValueError("the model config has no model_type: cannot tell which family's sizes it holds")
    try:
        return AutoConfig.for_model(model_type, **values)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"cannot read the model config of type {model_type!r}: {exc}") from exc


def model_compute(config: PretrainedConfig | Mapping[str, Any], context: int = DEFAULT_CONTEXT) -> ModelCompute:
    """The matmul work per token of each block and of the LM head of a model of a supported family
    (ValueError for another family, or a context that is not a positive number of tokens)."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"context must be a positive number of tokens, got {context!r}")
    config = as_config(config)
    family = family_for(config)
    reader = SHAPE_READERS.get(family.name)
    if reader is None:
        raise ValueError(f"no compute count for the {family.name} family: add its reader to SHAPE_READERS")
    shape = reader(config)
    window = getattr(config, "sliding_window", None)
    projections = shape.projection_macs()
    block_macs = tuple(
        projections + shape.score_macs(attended_keys(context, window if kind == SLIDING_ATTENTION else None))
        for kind in family.layer_attention_types(config))
    if len(block_macs) != family.num_layers(config):
        raise ValueError(f"the config names {len(block_macs)} layer types for {family.num_layers(config)} layers")
    return ModelCompute(block_macs=block_macs, head_macs=shape.hidden * int(config.vocab_size), context=context)


def compute_share(config: PretrainedConfig | Mapping[str, Any], n_bottom: int, n_top: int,
                  context: int = DEFAULT_CONTEXT) -> ComputeShare:
    """The split of a step's matmul work at a cut of ``n_bottom`` blocks before the trunk and ``n_top`` after
    it, for a model with this config (see the module doc for what is counted)."""
    return model_compute(config, context).share(n_bottom, n_top)
