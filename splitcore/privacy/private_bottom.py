"""A private Bottom: the client's Bottom starts as a secret, random variant of the public one.

The hidden-state attacks need to know the Bottom: the learned inversion is fit on the public
Bottom's output, the exact search runs the public Bottom on candidate tokens. So the client
draws its Bottom LoRA's B matrices from its secret instead of starting them at zero: from the
first step, the Bottom computes a function the trunk owner does not hold, and each LoRA
module changes its weight by ``scale`` times the weight's own (Frobenius) norm. The change is
part of the Bottom's LoRA, so the exported adapter carries it and the model a user loads is
the one that was trained; the Trunk's and Top's LoRA learn to work with it, which costs some
validation loss (measured in docs/privacy.md).
"""

from __future__ import annotations

import hashlib

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from splitcore.privacy.client_secret import ClientSecret

PRIVATE_BOTTOM = "private-bottom"


def _name_number(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")


@torch.no_grad()
def randomise_lora(part: nn.Module, secret: ClientSecret, seed: int, scale: float,
                   adapter_name: str = "default") -> int:
    """Draw every LoRA B of ``part`` from ``secret`` so each module's change has relative norm ``scale``.

    Returns the number of modules changed. ``scale`` 0 leaves the part as it is (B zero).
    """
    if scale <= 0:
        return 0
    changed = 0
    for name, module in part.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        lora_a = module.lora_A[adapter_name].weight  # (r, in)
        lora_b = module.lora_B[adapter_name].weight  # (out, r)
        base = module.get_base_layer().weight
        generator = torch.Generator().manual_seed(secret.derive(PRIVATE_BOTTOM, seed, _name_number(name)))
        drawn = torch.randn(lora_b.shape, generator=generator, dtype=torch.float32)
        change = (drawn @ lora_a.float()) * module.scaling[adapter_name]  # (out, in), or (in, out) transposed
        factor = scale * float(base.float().norm()) / max(float(change.norm()), 1e-12)
        lora_b.copy_((drawn * factor).to(lora_b.dtype))
        changed += 1
    if not changed:
        raise ValueError("the Bottom has no LoRA module to make private; check the LoRA target modules")
    return changed
