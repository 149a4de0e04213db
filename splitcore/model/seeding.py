"""Dropout seeds that depend on the step, not on a process's history.

Each micro-batch's dropout masks come from a seed derived from (run seed, step, micro-batch,
part). The client's Bottom and Top and the trunk (in another process, maybe restarted) each
draw their own, so a run resumed from a checkpoint, on a new trunk or a new worker, draws the
same masks as the uninterrupted run, and a trunk that recomputes a forward for Backward
recomputes it with the forward's masks.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager

import torch

CLIENT = "client"
TRUNK = "trunk"


def dropout_seed(seed: int, step: int, micro_batch: int, part: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{step}:{micro_batch}:{part}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # torch seeds are < 2**63


@contextmanager
def seeded_dropout(seed: int, device: torch.device | str = "cpu"):
    """Run a block with the generators of the CPU (and of ``device``, when it is a CUDA device)
    seeded, then restore them: other users of the generators see no change."""
    device = torch.device(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.manual_seed(seed)  # seeds the CUDA generators too
        yield
