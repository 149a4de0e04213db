"""AdamW state as a flat dict of named tensors (for safetensors), and back.

The optimizer's own ``state_dict`` is keyed by parameter position and holds Python
objects; this keys the state by parameter name so it survives a new process, a new
parameter order and the wire, without pickle.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from splitcore.remote.messages import OptimizerSettings

_STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")


def new_adamw(params, settings: OptimizerSettings) -> torch.optim.AdamW:
    """AdamW over ``params`` (learning rate 0: the trainer sets it each step), fused into one kernel per
    device where torch has one (CPU and CUDA): several times faster than a loop over hundreds of small LoRA
    tensors, with the same state (``exp_avg``, ``exp_avg_sq``, ``step``)."""
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=0.0, betas=(settings.beta1, settings.beta2), eps=settings.eps,
                             weight_decay=settings.weight_decay, fused=fused or None)


def grad_sq_norm(params) -> float:
    """The squared norm of the gradients of ``params`` (those without one count 0), summed in float64: inf or
    nan, never an error, when a gradient is not finite (its square cannot overflow float64)."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64)).pow(2).sum())


def scale_grads(params, coef: float) -> None:
    """Multiply the gradients of ``params`` by ``coef`` (a clip coefficient) in place; 1 changes nothing."""
    grads = [p.grad for p in params if p.grad is not None]
    if coef != 1.0 and grads:
        torch._foreach_mul_(grads, coef)


def adamw_state_tensors(optimizer: torch.optim.Optimizer, named_params: Mapping[str, torch.nn.Parameter],
                        prefix: str = "optimizer.") -> dict[str, torch.Tensor]:
    by_param = {id(p): name for name, p in named_params.items()}
    tensors: dict[str, torch.Tensor] = {}
    for param, state in optimizer.state.items():
        name = by_param.get(id(param))
        if name is None:
            continue
        for key in _STATE_KEYS:
            if key in state:
                value = state[key]
                value = value if torch.is_tensor(value) else torch.tensor(float(value))
                tensors[f"{prefix}{name}.{key}"] = value.detach().to("cpu").clone()
    return tensors


def load_adamw_state(optimizer: torch.optim.Optimizer, named_params: Mapping[str, torch.nn.Parameter],
                     tensors: Mapping[str, torch.Tensor], prefix: str = "optimizer.") -> None:
    """Restore what ``adamw_state_tensors`` produced; ValueError names the first mismatch."""
    expected_names = set(named_params)
    seen: set[str] = set()
    for key in tensors:
        if not key.startswith(prefix):
            continue
        name, _, field = key[len(prefix):].rpartition(".")
        if field not in _STATE_KEYS or name not in expected_names:
            raise ValueError(f"optimizer state {key!r} does not belong to any trainable parameter")
        seen.add(name)
    optimizer.state.clear()
    fused = bool(optimizer.defaults.get("fused"))
    for name in seen:
        param = named_params[name]
        state = {}
        for field in _STATE_KEYS:
            value = tensors.get(f"{prefix}{name}.{field}")
            if value is None:
                raise ValueError(f"optimizer state for {name!r} lacks {field!r}")
            if field != "step" and value.shape != param.shape:
                raise ValueError(f"optimizer state {name}.{field} has shape {list(value.shape)}, "
                                 f"the parameter has {list(param.shape)}")
            if field == "step":
                _check_step_count(name, value)
            if field == "step":  # a fused AdamW counts on the parameter's device, the others on the CPU
                state[field] = value.to(dtype=torch.float32, device=param.device if fused else "cpu").clone()
            else:
                state[field] = value.to(param).clone()
        optimizer.state[param] = state


def _check_step_count(name: str, value: torch.Tensor) -> None:
    """AdamW reads the step count as one number and takes square roots of 1 - beta ** step."""
    count = float(value.reshape(())) if value.numel() == 1 else None
    if count is None or not math.isfinite(count) or count < 0:
        held = f"shape {list(value.shape)}" if count is None else f"the value {count}"
        raise ValueError(f"optimizer state {name}.step must be one finite number >= 0, got {held}")
