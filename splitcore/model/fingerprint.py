"""A fingerprint of a part's weights, so a client can tell that a trunk serves its model.

The fingerprint combines one digest per tensor (name, shape, dtype and bytes), so a trunk
server can digest its weights once, as loaded, and then fingerprint any range of blocks, and
keep doing so after it casts its blocks to another compute dtype or moves them to a GPU.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of the module's weights."""
    return state_fingerprint(module.state_dict())


def tensor_digests(state: Mapping[str, torch.Tensor]) -> dict[str, bytes]:
    """One sha256 per tensor of a state dict, over its name, shape, dtype and bytes."""
    digests = {}
    for name, tensor in state.items():
        digest = hashlib.sha256(f"{name}|{list(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        digests[name] = digest.digest()
    return digests


def combine_digests(digests: Mapping[str, bytes]) -> str:
    """The fingerprint of the tensors whose ``tensor_digests`` are given."""
    combined = hashlib.sha256()
    for name in sorted(digests):
        combined.update(digests[name])
    return combined.hexdigest()


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes, dtypes and bytes of a state dict."""
    return combine_digests(tensor_digests(state))
