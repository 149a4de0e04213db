"""Text generation with the trunk on a trunk server (or a chain of them): Bottom and Top here, each
with a KV cache, and each trunk's own KV cache in an inference session. Each new token costs one
position on every side.

With a merged adapter, Bottom and Top get their LoRA from ``peft`` and the trunk's LoRA
weights are sent to the inference session, so the answer is the one the unsplit model
with the adapter gives.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.logits_process import TopPLogitsWarper

from splitcore.generation.local import GenerationSettings
from splitcore.model.adapter_export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_part_adapter
from splitcore.model.lora import PEFT_TYPES, LoraSettings
from splitcore.model.part_loading import CheckpointModel, ModelParts, model_parts
from splitcore.privacy.noise import ChannelNoise
from splitcore.remote import state as trunk_state
from splitcore.remote.client import TrunkClient
from splitcore.remote.chain import layer_of, naming_link, plan_links
from splitcore.remote.trunk import check_trunk_serves


def adapter_lora_settings(adapter_dir: str | os.PathLike) -> LoraSettings:
    """The LoraSettings of a PEFT adapter directory (for the trunk's share of it), of any method a job can use."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the adapter config {path}: {exc}") from exc
    targets = config.get("target_modules") or ()
    if isinstance(targets, str):
        raise ValueError(f"{path}: target_modules is a pattern ({targets!r}); split inference needs a list of "
                         "module names")
    peft_type = str(config.get("peft_type", "LORA"))
    method = next((m for m, t in PEFT_TYPES.items() if t == peft_type), None)
    if method is None:
        raise ValueError(f"{path}: peft_type {peft_type!r} is not a method split inference can run "
                         f"({', '.join(PEFT_TYPES.values())})")
    targets = tuple(sorted(t.rsplit(".", 1)[-1] for t in targets))
    if method == "ia3":
        return LoraSettings(method=method, target_modules=targets)
    if method != "lora":
        return LoraSettings(method=method, r=int(config["r"]), alpha=float(config["alpha"]),
                            dropout=float(config.get("rank_dropout", 0.0)), target_modules=targets)
    return LoraSettings(r=int(config["r"]), alpha=float(config["lora_alpha"]),
                        dropout=float(config.get("lora_dropout", 0.0)), target_modules=targets,
                        use_dora=bool(config.get("use_dora", False)), use_rslora=bool(config.get("use_rslora", False)))


class SplitGenerator:
    """Generate through a trunk server or a chain of them; one inference session per link per ``generate``
    call."""

    def __init__(self, model: PreTrainedModel | ModelParts, client: TrunkClient | Sequence[TrunkClient],
                 adapter_dir: str | os.PathLike | None = None, n_bottom: int | None = None,
                 n_top: int | None = None, device: str | torch.device = "cpu") -> None:
        """``model``: a freshly loaded base model (peft adds the adapter to its modules), or a
        ``ModelParts`` that loads only the Bottom and Top of the chosen cut.

        ``client``: the trunk's client, or one per link of a chain in block order.
        ``n_bottom``/``n_top``: blocks kept here before and after the trunk (None: the trunk's default).
        ``device``: where the Bottom and Top compute.
        """
        self.device = torch.device(device)
        parts = model_parts(model)
        self.config = parts.config
        self.family = parts.family
        self.clients = [client] if isinstance(client, TrunkClient) else list(client)
        plan, infos = plan_links(self.clients, self.config, self.family, n_bottom, n_top)
        # One row: the model's positions and every link's KV-cache budget bound the same length (0: not reported).
        self._positions_allowed = min((n for info in infos for n in (info.max_positions, info.max_kv_tokens) if n),
                                      default=None)
        spec = plan.spec
        bottom, top = parts.client_parts(spec)
        self.layers = spec.trunk_layers
        self.link_layers = plan.layers
        self._trunk_fingerprints = [parts.trunk_fingerprint(layers) for layers in plan.layers]
        self.trunk_lora: LoraSettings | None = None
        self.trunk_weights: list[bytes] | None = None  # per link
        if adapter_dir is not None:
            # peft adds each part's adapter layers to the part's own modules; the frozen weights stay shared.
            bottom, top = load_part_adapter(bottom, adapter_dir), load_part_adapter(top, adapter_dir)
            self._trunk_share(adapter_dir)
        self.bottom, self.top = bottom.eval().to(self.device), top.eval().to(self.device)
        self.client = self.clients[0]
        self.generation_config = parts.generation_config

    @classmethod
    def from_directory(cls, model_dir: str | os.PathLike, client: TrunkClient | Sequence[TrunkClient],
                       adapter_dir: str | os.PathLike | None = None, n_bottom: int | None = None,
                       n_top: int | None = None) -> SplitGenerator:
        return cls(CheckpointModel(model_dir), client, adapter_dir, n_bottom, n_top)

    def _trunk_share(self, adapter_dir) -> None:
        """Each link's share of the adapter's trunk weights."""
        weights = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
        marker = f".{self.family.layers_attr}."
        shares = [{k: v for k, v in weights.items() if layer_of(k, marker) in layers} for layers in self.link_layers]
        if any(shares):
            self.trunk_lora = adapter_lora_settings(adapter_dir)
            self.trunk_weights = [trunk_state.pack(share) for share in shares]

    def _eos_ids(self, tokenizer: PreTrainedTokenizerBase) -> set[int]:
        eos = self.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        return ids

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, tokenizer: PreTrainedTokenizerBase,
                 settings: GenerationSettings = GenerationSettings(),
                 noise: ChannelNoise | None = None) -> Iterator[int]:
        """Yield new token ids one by one for a (1, seq) prompt; stops at an end-of-sequence token.

        ``noise``: the hidden states sent to the trunk (the prompt's, then each new token's) are clipped and
        blurred with its ``hidden_scale``, as a training run's are (``ChannelNoise.on_generated_hidden``). Give
        each call a ``ChannelNoise`` whose key mixes in a fresh nonce, so no two prompts share a draw.
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"generate takes one prompt of shape (1, seq), got {tuple(input_ids.shape)}")
        wanted = input_ids.shape[1] + settings.max_new_tokens
        if self._positions_allowed is not None and wanted > self._positions_allowed:
            raise ValueError(f"a prompt of {input_ids.shape[1]} tokens and {settings.max_new_tokens} new tokens need "
                             f"{wanted} positions; the trunk allows {self._positions_allowed} per generation "
                             "(a shorter prompt or fewer new tokens)")
        eos_ids = self._eos_ids(tokenizer)
        generator = torch.Generator().manual_seed(settings.seed)
        top_p = TopPLogitsWarper(settings.top_p) if settings.top_p < 1.0 else None
        bottom_cache, top_cache = DynamicCache(config=self.config), DynamicCache(config=self.config)
        opened: list[TrunkClient] = []
        try:
            for index, (client, layers) in enumerate(zip(self.clients, self.link_layers, strict=True)):
                reply = client.open_session(self.trunk_lora, inference=True, label="generate", layers=layers)
                opened.append(client)
                with naming_link(index, client, len(self.clients)):
                    check_trunk_serves(reply.info, self.config, self.family,
                                       trunk_fingerprint=self._trunk_fingerprints[index])
                if self.trunk_weights is not None:
                    client.import_state(0, self.trunk_weights[index])
            new_ids = input_ids.to(self.device)
            mask = torch.ones_like(new_ids)
            for position in range(settings.max_new_tokens):
                hidden = self.bottom(new_ids, mask, past_key_values=bottom_cache, use_cache=True)  # (1, new, hidden)
                if noise is not None:
                    hidden = noise.on_generated_hidden(hidden, position)  # what the first link receives
                for client in self.clients:
                    hidden = client.infer(position, hidden, mask)  # (1, new, hidden)
                logits = self.top(hidden, mask, past_key_values=top_cache, use_cache=True,
                                  logits_to_keep=1).logits[:, -1, :]  # (1, vocab)
                token = self._choose(logits, settings, top_p, generator)
                yield token
                if token in eos_ids:
                    return
                new_ids = torch.tensor([[token]], device=self.device)
                mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype, device=self.device)], dim=1)
        finally:
            for client in opened:
                client.close_session_quietly()

    @staticmethod
    def _choose(logits: torch.Tensor, settings: GenerationSettings, top_p, generator) -> int:
        if settings.temperature == 0:
            return int(logits.argmax(dim=-1))
        scores = logits.float().cpu() / settings.temperature  # the sampling generator is the CPU's
        if top_p is not None:
            scores = top_p(None, scores)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator))
