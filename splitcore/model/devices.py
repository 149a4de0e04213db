"""Device names as users write them (``auto``, ``cpu``, ``cuda``, ``cuda:N``), checked against this machine."""

from __future__ import annotations

import re

import torch

DEVICES = "auto, cpu, cuda or cuda:N"
# Compute dtypes by the names users give them.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What a client (the CLI, a web worker) may hold its frozen Bottom and Top in; its adapters stay fp32.
CLIENT_DTYPES = ("fp32", "bf16")
DEVICE_NAME = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(name: str) -> str:
    """"auto": the first CUDA device when there is one, else the CPU; ValueError for a device this
    machine does not have."""
    if not isinstance(name, str) or not DEVICE_NAME.match(name):
        raise ValueError(f"device must be {DEVICES}, got {name!r}")
    if name == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    index = int(name[5:]) if ":" in name else 0
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: this machine has no CUDA device (torch {torch.__version__}); "
                         "use cpu or auto")
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return f"cuda:{index}"
