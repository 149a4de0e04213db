"""The frozen trunk blocks, loaded once and shared by every session.

Each training session adds one named ``peft`` LoRA adapter to the shared trunk (or
none, for a frozen trunk); the base weights exist once in memory. Model compute is
serialised by one lock: switching the active adapter and running a block must not
interleave between sessions.
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
from splitcore.fingerprint import weights_fingerprint
from splitcore.lora import present_targets
from splitcore.seeding import seeded_dropout

from .config import TrunkServerConfig


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
        _, trunk, _ = split_model(model, config.n_bottom, config.n_top)
        del model  # the Bottom and Top weights are freed with the full model
        self.trunk = trunk
        self.model_id = model_id or model_dir.name
        self.num_layers = self.family.num_layers(self.config)
        self.trunk_start = trunk.layer_indices[0]
        self.trunk_end = trunk.layer_indices[-1] + 1
        self.hidden_size = int(self.config.hidden_size)
        self.dtype = next(trunk.parameters()).dtype
        self.fingerprint = weights_fingerprint(trunk)
        self.lock = threading.RLock()
        self._peft: PeftModel | None = None

    # -------------------------------------------------------------- adapters

    def add_adapter(self, name: str, settings: LoraSettings, seed: int) -> dict[str, torch.nn.Parameter]:
        """Add a LoRA adapter for one session; returns its parameters by full-model name."""
        targets = present_targets(self.trunk, settings.targets_for(self.family))
        if not targets:
            raise ValueError(f"none of the LoRA target modules {', '.join(settings.targets_for(self.family))} "
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

    def forward(self, adapter: str | None, hidden: torch.Tensor, attention_mask: torch.Tensor,
                past_key_values: Cache | None = None, training: bool = False, seed: int = 0) -> torch.Tensor:
        """Run the trunk; the caller decides whether autograd records (torch.no_grad or not).

        ``training`` switches dropout (the base model's and LoRA's) on, as in the client's parts,
        with masks drawn from ``seed``.
        """
        with self.lock, self._adapter(adapter) as module, seeded_dropout(seed):
            module.train(training)
            use_cache = past_key_values is not None
            return module(hidden, attention_mask, past_key_values=past_key_values, use_cache=use_cache)

    def backward(self, adapter: str | None, output: torch.Tensor, grad_output: torch.Tensor) -> None:
        # set_adapter() turns requires_grad off for every other adapter, and autograd drops
        # gradients of leaves that no longer require grad: re-activate this session's adapter.
        with self.lock, self._adapter(adapter):
            output.backward(grad_output)
