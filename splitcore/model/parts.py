"""The three parts of a split causal LM: Bottom, Trunk and Top.

Each part is an ``nn.Module`` that keeps the full model's module paths: its blocks
live in a ``ModuleDict`` keyed by the *global* layer index, under the same attribute
names as in the full model (``model.layers.7`` stays ``model.layers.7``). So the
PEFT state-dict keys of the three parts are exactly the full model's keys.

Only hidden states and the 2-D padding mask cross a cut. Every part rebuilds the
4-D attention mask and the position ids from the 2-D mask itself, so positions come
from the mask: a left-padded row starts at position 0 like an unpadded one.

The parts share their submodules with the model they were cut from (no copy).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

from splitcore.model.architectures import FULL_ATTENTION, SLIDING_ATTENTION, ArchitectureFamily, family_for
from splitcore.model.split_spec import SplitSpec

_MASK_BUILDERS = {
    FULL_ATTENTION: create_causal_mask,
    SLIDING_ATTENTION: create_sliding_window_causal_mask,
}


def positions_from_mask(attention_mask: torch.Tensor, query_length: int) -> torch.Tensor:
    """Position ids of the last ``query_length`` tokens, counting only unpadded tokens.

    ``attention_mask`` is (batch, past + query) with 1 for real tokens. Padded slots get
    position 1 (any valid index: their attention is masked out either way).
    """
    mask = attention_mask.long()
    positions = mask.cumsum(-1) - 1  # (batch, past + query)
    positions = positions.masked_fill(mask == 0, 1)
    return positions[:, -query_length:]  # (batch, query)


class Backbone(nn.Module):
    """Container for the backbone submodules a part owns, under their original names."""


class SplitPart(nn.Module):
    """Shared machinery: the owned blocks, masks, positions and the block loop."""

    def __init__(
        self,
        family: ArchitectureFamily,
        config: PretrainedConfig,
        layer_indices: range,
        blocks: nn.ModuleList,
        backbone_modules: dict[str, nn.Module],
    ) -> None:
        super().__init__()
        self.family = family
        self.config = config
        self.layer_indices = tuple(layer_indices)
        backbone = Backbone()
        for name, module in backbone_modules.items():
            backbone.add_module(name, module)
        backbone.add_module(
            family.layers_attr, nn.ModuleDict({str(i): blocks[i] for i in self.layer_indices})
        )
        self.add_module(family.backbone_attr, backbone)
        attention_types = family.layer_attention_types(config)
        self._attention_types = {i: attention_types[i] for i in self.layer_indices}

    @property
    def backbone(self) -> Backbone:
        return getattr(self, self.family.backbone_attr)

    @property
    def blocks(self) -> nn.ModuleDict:
        return getattr(self.backbone, self.family.layers_attr)

    def _prepare(
        self,
        hidden_or_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        past_key_values: Cache | None,
        past_layer: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fill in the default 2-D mask (all tokens real) and the positions from it."""
        batch, query_length = hidden_or_ids.shape[:2]
        if attention_mask is None:
            layer = self.layer_indices[0] if past_layer is None else past_layer
            past = 0 if past_key_values is None else past_key_values.get_seq_length(layer)
            attention_mask = torch.ones(batch, past + query_length, dtype=torch.long, device=hidden_or_ids.device)
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < query_length:
            raise ValueError(
                f"attention_mask must be (batch, past + seq) = ({batch}, >= {query_length}), "
                f"got {tuple(attention_mask.shape)}"
            )
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, query_length)
        return attention_mask, position_ids

    def _run_blocks(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: Cache | None,
        use_cache: bool,
        layer_indices: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """Run the owned blocks, or the subset ``layer_indices`` of them, in order."""
        layer_indices = self.layer_indices if layer_indices is None else layer_indices
        attention_types = {i: self._attention_types[i] for i in layer_indices}
        masks = {}
        for kind in dict.fromkeys(attention_types.values()):
            first_layer = next(i for i, k in attention_types.items() if k == kind)
            masks[kind] = _MASK_BUILDERS[kind](
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                past_key_values=past_key_values,
                position_ids=position_ids,
                layer_idx=first_layer,
            )
        # Per attention type: some families rotate local and global layers differently.
        extras = {kind: self.family.block_kwargs(self.backbone, hidden, position_ids, kind) for kind in masks}
        for index in layer_indices:
            kind = attention_types[index]
            hidden = self.blocks[str(index)](
                hidden,
                attention_mask=masks[kind],
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **extras[kind],
            )  # (batch, seq, hidden)
        return hidden


class Bottom(SplitPart):
    """Token embeddings + the first decoder blocks: ``(input_ids, mask) -> hidden``."""

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """What the first block receives: the (position-aware) embeddings, (batch, seq, hidden)."""
        attention_mask, position_ids = self._prepare(input_ids, attention_mask, None, None)
        return self.family.embed(self.backbone, input_ids, position_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool = False,
    ) -> torch.Tensor:
        attention_mask, position_ids = self._prepare(input_ids, attention_mask, position_ids, past_key_values)
        hidden = self.family.embed(self.backbone, input_ids, position_ids)  # (batch, seq, hidden)
        return self._run_blocks(hidden, attention_mask, position_ids, past_key_values, use_cache)


class Trunk(SplitPart):
    """The middle decoder blocks: ``(hidden, mask) -> hidden``.

    ``layers`` runs a contiguous sub-range of the owned blocks instead of all of them: a
    trunk server holds the widest range its operator allows and each session runs its own.
    """

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool = False,
        layers: range | None = None,
    ) -> torch.Tensor:
        indices = None
        if layers is not None:
            indices = tuple(layers)
            if not indices or indices[0] < self.layer_indices[0] or indices[-1] > self.layer_indices[-1]:
                raise ValueError(f"layers {layers.start}-{layers.stop - 1} are not within this trunk's "
                                 f"{self.layer_indices[0]}-{self.layer_indices[-1]}")
        past_layer = self.layer_indices[0] if indices is None else indices[0]
        attention_mask, position_ids = self._prepare(hidden, attention_mask, position_ids, past_key_values,
                                                     past_layer)
        return self._run_blocks(hidden, attention_mask, position_ids, past_key_values, use_cache, indices)


class Top(SplitPart):
    """The last decoder blocks, the final norm and the LM head: ``(hidden, mask) -> logits``.

    The logits get whatever the full model's forward applies after the LM head (Gemma's
    final soft-capping), through ``family.logits``.

    With ``labels`` it also returns the shifted next-token cross-entropy (``-100`` is
    ignored), averaged over ``num_items_in_batch`` labelled tokens when given (for
    gradient accumulation), else over this batch's labelled tokens.
    """

    def __init__(self, *args, lm_head: nn.Module, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lm_head = lm_head

    def final_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     position_ids: torch.Tensor | None = None, past_key_values: Cache | None = None,
                     use_cache: bool = False) -> torch.Tensor:
        """The Top's blocks and final norm: what the LM head reads (batch, seq, hidden)."""
        attention_mask, position_ids = self._prepare(hidden, attention_mask, position_ids, past_key_values)
        hidden = self._run_blocks(hidden, attention_mask, position_ids, past_key_values, use_cache)
        return getattr(self.backbone, self.family.final_norm_attr)(hidden)

    def head_logits(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """The logits of ``final_hidden`` (..., hidden) -> (..., vocab)."""
        return self.family.logits(self.config, self.lm_head(final_hidden))

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool = False,
        num_items_in_batch: int | torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> CausalLMOutputWithPast:
        hidden = self.final_hidden(hidden, attention_mask, position_ids, past_key_values, use_cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:, :]
        logits = self.head_logits(hidden)  # (batch, seq, vocab)
        loss = None
        if labels is not None:
            loss = ForCausalLMLoss(
                logits, labels, vocab_size=self.config.vocab_size, num_items_in_batch=num_items_in_batch
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)


def split_model(model: PreTrainedModel, n_bottom: int, n_top: int) -> tuple[Bottom, Trunk, Top]:
    """Cut a Hugging Face ``*ForCausalLM`` into Bottom, Trunk and Top.

    Bottom gets the embeddings and the first ``n_bottom`` blocks, Top the last ``n_top``
    blocks, the final norm and the LM head, the Trunk the blocks in between. Raises
    ``ValueError`` for an unsupported architecture or a split that leaves a part empty.
    The parts share modules with ``model``; adding LoRA to a part changes ``model`` too.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"expected a Hugging Face *ForCausalLM model, got {type(model).__name__}")
    family = family_for(config)
    backbone = getattr(model, family.backbone_attr, None)
    lm_head = getattr(model, "lm_head", None)
    if backbone is None or lm_head is None:
        raise ValueError(
            f"expected a {family.name} *ForCausalLM model with .{family.backbone_attr} and .lm_head, "
            f"got {type(model).__name__}"
        )
    spec = SplitSpec(num_layers=family.num_layers(config), n_bottom=n_bottom, n_top=n_top)
    blocks = getattr(backbone, family.layers_attr)
    if len(blocks) != spec.num_layers:
        raise ValueError(f"config says {spec.num_layers} layers but the model holds {len(blocks)} blocks")

    def take(names: tuple[str, ...]) -> dict[str, nn.Module]:
        return {name: getattr(backbone, name) for name in names}

    shared = take(family.shared_attrs)
    bottom = Bottom(family, config, spec.bottom_layers, blocks, {**take(family.embedding_attrs), **shared})
    trunk = Trunk(family, config, spec.trunk_layers, blocks, dict(shared))
    top = Top(
        family,
        config,
        spec.top_layers,
        blocks,
        {**shared, **take((family.final_norm_attr,))},
        lm_head=lm_head,
    )
    return bottom, trunk, top
