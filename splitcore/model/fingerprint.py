"""A fingerprint of a part's weights, so a client can tell that a trunk serves its model."""

from __future__ import annotations

import hashlib

import torch


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of the module's weights."""
    return state_fingerprint(module.state_dict())


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes, dtypes and bytes of a state dict."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(f"{name}|{list(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
