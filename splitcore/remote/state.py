"""The trunk-state format: what ``ExportState`` returns and ``ImportState`` takes.

One safetensors file: the session's trunk LoRA weights under ``adapter.<full-model PEFT key>``
and its AdamW state under ``optimizer.<...>`` (see ``splitcore.training.optim_state``), with
the format tag and the last applied step in the metadata. Adapter weights alone (no
``optimizer.`` entries) are a valid state too: that is how an inference session gets a
trained trunk adapter. The client's own checkpoint half uses the same two prefixes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

FORMAT = "splitlearn-trunk-state-v1"
ADAPTER_PREFIX = "adapter."
OPTIMIZER_PREFIX = "optimizer."


@dataclass
class TrunkState:
    adapter: dict[str, torch.Tensor] = field(default_factory=dict)  # full-model PEFT keys
    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)  # keys keep the ``optimizer.`` prefix
    applied_step: int | None = None


def pack(adapter: Mapping[str, torch.Tensor], optimizer: Mapping[str, torch.Tensor] | None = None,
         applied_step: int | None = None) -> bytes:
    """``optimizer``: tensors already named ``optimizer.*`` (as ``adamw_state_tensors`` names them)."""
    tensors = {ADAPTER_PREFIX + key: value for key, value in adapter.items()}
    tensors.update(optimizer or {})
    metadata = {"format": FORMAT}
    if applied_step is not None:
        metadata["applied_step"] = str(applied_step)
    return save_safetensors(tensors, metadata=metadata)


def unpack(data: bytes) -> TrunkState:
    """ValueError naming the problem when ``data`` is not a trunk state (empty bytes: an empty state)."""
    if not data:
        return TrunkState()
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, io.UnsupportedOperation) as exc:
        raise ValueError(f"state is not a valid safetensors file: {exc}") from exc
    state = TrunkState()
    for key, value in tensors.items():
        if key.startswith(ADAPTER_PREFIX):
            state.adapter[key[len(ADAPTER_PREFIX):]] = value
        elif key.startswith(OPTIMIZER_PREFIX):
            state.optimizer[key] = value
        else:
            raise ValueError(f"state holds an unknown entry {key!r} (entries start with "
                             f"{ADAPTER_PREFIX!r} or {OPTIMIZER_PREFIX!r})")
    return state


def adapter_weights(data: bytes) -> dict[str, torch.Tensor]:
    """The trunk LoRA weights (full-model PEFT keys) of an exported state."""
    return unpack(data).adapter
