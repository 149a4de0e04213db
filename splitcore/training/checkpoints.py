"""Checkpoints that hold both sides of a run, written so a crash never leaves half of one.

A checkpoint is a directory ``step-00000012/`` with
- ``trainer_state.json``: step, totals, elapsed time, the settings that must match on resume;
- ``client_state.safetensors``: this process's LoRA weights (``adapter.*``), AdamW state
  (``optimizer.*``) and the torch RNG state (``rng.torch``);
- ``trunk_state.safetensors``: the trunk adapter and optimizer state from ``ExportState``
  (split runs with trunk LoRA).
It is written into a staging directory and renamed into place; only then are older
checkpoints pruned. A failed write leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT = "splitlearn-checkpoint-v1"
STATE_FILE = "trainer_state.json"
CLIENT_FILE = "client_state.safetensors"
TRUNK_FILE = "trunk_state.safetensors"
PREFIX = "step-"


@dataclass(frozen=True)
class CheckpointState:
    step: int
    total_steps: int
    elapsed_s: float
    mode: str  # "split" or "local"
    settings: dict  # TrainConfig.resume_key()
    loss: float | None = None
    val_loss: float | None = None


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    state: CheckpointState
    client_tensors: dict[str, torch.Tensor]
    trunk_state: bytes | None


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def save_checkpoint(root: str | os.PathLike, state: CheckpointState, client_tensors: dict[str, torch.Tensor],
                    trunk_state: bytes | None, keep: int = 2) -> Path:
    """Write ``root/step-N`` atomically and keep the newest ``keep`` checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = root / checkpoint_name(state.step)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    try:
        save_file({k: v.contiguous() for k, v in client_tensors.items()}, staging / CLIENT_FILE,
                  metadata={"format": FORMAT})
        if trunk_state:
            (staging / TRUNK_FILE).write_bytes(trunk_state)
        (staging / STATE_FILE).write_text(json.dumps({"format": FORMAT, **asdict(state)}, indent=2))
        for name in os.listdir(staging):
            _fsync_file(staging / name)
        if target.exists():  # the same step saved again (e.g. cancel right after a periodic save)
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself when it is a checkpoint, else its newest checkpoint."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path} is not a checkpoint and holds no {PREFIX}* checkpoint directories")
    return found[-1]


def read_checkpoint_state(path: str | os.PathLike) -> CheckpointState:
    """The ``trainer_state.json`` of a checkpoint (or of the newest under ``path``)."""
    return _read_state(find_checkpoint(path))


def _read_state(path: Path) -> CheckpointState:
    try:
        raw = json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"checkpoint {path}: unreadable {STATE_FILE}: {exc}") from exc
    if not isinstance(raw, dict) or raw.pop("format", None) != FORMAT:
        raise ValueError(f"checkpoint {path} is not a {FORMAT} checkpoint")
    try:
        return CheckpointState(**raw)
    except TypeError as exc:
        raise ValueError(f"checkpoint {path}: {STATE_FILE} does not match {FORMAT}: {exc}") from exc


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    path = find_checkpoint(path)
    state = _read_state(path)
    client_file = path / CLIENT_FILE
    if not client_file.is_file():
        raise FileNotFoundError(f"checkpoint {path} lacks {CLIENT_FILE}")
    trunk_file = path / TRUNK_FILE
    trunk_state = trunk_file.read_bytes() if trunk_file.is_file() else None
    return Checkpoint(path=path, state=state, client_tensors=load_file(client_file), trunk_state=trunk_state)
