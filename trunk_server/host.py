"""The frozen trunk blocks, loaded once and shared by every session.

The host holds the widest range of blocks its operator allows; each session runs its own
contiguous sub-range (its client's cut). Each training session adds one named ``peft``
LoRA adapter on the blocks of its range (or none, for a frozen trunk); the base weights
exist once in memory. Model compute is serialised by one lock: switching the active
adapter and running a block must not interleave between sessions.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM
from transformers.cache_utils import Cache

from splitcore import LoraSettings, family_for, init_lora_weights, split_model
from splitcore.model.fingerprint import state_fingerprint
from splitcore.model.lora import modules_in_layers, present_targets
from splitcore.model.split_spec import CutBounds, SplitSpec
from splitcore.model.seeding import seeded_dropout

from .config import TrunkServerConfig


class LayerRangeRefused(ValueError):
    """A session asked for layers outside the bounds the operator allows."""


class TrunkHost:
    def __init__(self, config: TrunkServerConfig, model_id: str | None = None) -> None:
        model_dir = Path(config.model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"model directory {model_dir} has no config.json")
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        self.config = model.config
        self.family = family_for(model.config)
        self.num_layers = self.family.num_layers(self.config)
        default = SplitSpec(self.num_layers, config.n_bottom, config.n_top)
        _, trunk, _ = split_model(model, config.min_bottom, config.min_top)
        del model  # the Bottom and Top weights are freed with the full model
        self.trunk = trunk
        self.model_id = model_id or model_dir.name
        self.bounds = CutBounds(num_layers=self.num_layers, default=default.trunk_layers,
                                lowest=trunk.layer_indices[0], highest=trunk.layer_indices[-1] + 1)
        self.hidden_size = int(self.config.hidden_size)
        self.dtype = next(trunk.parameters()).dtype
        # The frozen weights under their own names, before peft wraps any module (shares storage, no copy).
        self._base_state = dict(trunk.state_dict())
        self._fingerprints: dict[range, str] = {}
        self.lock = threading.RLock()
        self._peft: PeftModel | None = None

    # -------------------------------------------------------------- layer ranges

    def layers_for(self, start: int, end: int) -> range:
        """The range a session asked for (0, 0: the default), or LayerRangeRefused."""
        if start == 0 and end == 0:
            return self.bounds.default
        if not self.bounds.allows(range(start, end)):
            lowest, highest = self.bounds.lowest, self.bounds.highest
            raise LayerRangeRefused(
                f"layers {start}-{end - 1} are outside what this trunk serves: a session may run any range "
                f"within layers {lowest}-{highest - 1} of {self.num_layers} (at least "
                f"{lowest} blocks stay with the client before the trunk and "
                f"{self.num_layers - highest} after it)")
        return range(start, end)

    def fingerprint_of(self, layers: range) -> str:
        """sha256 of the frozen weights of ``layers``, as the client computes it on its own trunk part."""
        if layers not in self._fingerprints:
            owned = {f".{self.family.layers_attr}.{i}." for i in layers}
            state = {key: value for key, value in self._base_state.items()
                     if f".{self.family.layers_attr}." not in key or any(marker in key for marker in owned)}
            self._fingerprints[layers] = state_fingerprint(state)
        return self._fingerprints[layers]

    # -------------------------------------------------------------- adapters

    def add_adapter(self, name: str, settings: LoraSettings, seed: int,
                    layers: range) -> dict[str, torch.nn.Parameter]:
        """Add a LoRA adapter on the blocks ``layers`` for one session; returns its parameters by full-model name."""
        wanted = settings.targets_for(self.family)
        targets = modules_in_layers(self.trunk, self.family, present_targets(self.trunk, wanted), layers)
        if not targets:
            raise ValueError(f"none of the LoRA target modules {', '.join(wanted)} "
                             f"exist in the trunk; the {self.family.name} projections are "
                             f"{', '.join(self.family.lora_targets)}")
        peft_config = settings.peft_config(self.family, targets)
        with self.lock:
            if self._peft is None:
                self._peft = get_peft_model(self.trunk, peft_config, adapter_name=name)
            else:
                self._peft.add_adapter(name, peft_config)
            init_lora_weights(self._peft, seed, adapter_name=name)
            marker = f".{name}."
            return {
                key.removeprefix("base_model.model.").replace(marker, "."): param
                for key, param in self._peft.named_parameters()
                if marker in key
            }

    def remove_adapter(self, name: str) -> None:
        with self.lock:
            if self._peft is not None and name in self._peft.peft_config:
                self._peft.delete_adapter(name)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        with self.lock:
            state = get_peft_model_state_dict(self._peft, adapter_name=name)
            return {key: value.detach().to("cpu").clone() for key, value in state.items()}

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        expected = self.adapter_state(name)
        missing = expected.keys() - state.keys()
        unexpected = state.keys() - expected.keys()
        if missing or unexpected:
            first = sorted(missing or unexpected)[0]
            raise ValueError(f"adapter state does not match this session's LoRA: "
                             f"{'missing' if missing else 'unexpected'} weight {first!r}")
        for key, value in state.items():
            if value.shape != expected[key].shape:
                raise ValueError(f"adapter weight {key!r} has shape {list(value.shape)}, "
                                 f"the session's has {list(expected[key].shape)}")
        with self.lock:
            set_peft_model_state_dict(self._peft, state, adapter_name=name)

    # -------------------------------------------------------------- compute

    @contextlib.contextmanager
    def _adapter(self, name: str | None):
        """Run with the session's adapter active, or with every adapter off."""
        if self._peft is None:
            yield self.trunk
        elif name is None:
            # The tuner-level switch: PeftModel.disable_adapter() fails once the active adapter is deleted.
            self._peft.base_model.disable_adapter_layers()
            try:
                yield self.trunk  # the wrapped module itself: PeftModel.forward also needs an active adapter
            finally:
                self._peft.base_model.enable_adapter_layers()
        else:
            self._peft.set_adapter(name)
            yield self._peft

    def forward(self, adapter: str | None, layers: range, hidden: torch.Tensor, attention_mask: torch.Tensor,
                past_key_values: Cache | None = None, training: bool = False, seed: int = 0) -> torch.Tensor:
        """Run the blocks ``layers``; the caller decides whether autograd records (torch.no_grad or not).

        ``training`` switches dropout (the base model's and LoRA's) on, as in the client's parts,
        with masks drawn from ``seed``.
        """
        with self.lock, self._adapter(adapter) as module, seeded_dropout(seed):
            module.train(training)
            use_cache = past_key_values is not None
            return module(hidden, attention_mask, past_key_values=past_key_values, use_cache=use_cache,
                          layers=layers)

    def backward(self, adapter: str | None, output: torch.Tensor, grad_output: torch.Tensor) -> None:
        # set_adapter() turns requires_grad off for every other adapter, and autograd drops
        # gradients of leaves that no longer require grad: re-activate this session's adapter.
        with self.lock, self._adapter(adapter):
            output.backward(grad_output)
