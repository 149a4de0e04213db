"""Base models and tokenizers from MODELS_DIR, and the frozen weights a worker process shares.

A worker holds only the pieces its jobs run: the embeddings, the blocks before and after
each job's cut, the final norm and the LM head, read from the checkpoint in WORKER_DTYPE on
WORKER_DEVICE. One store per process keeps them (WORKER_MODEL_CACHE_GB, least recently used
out), so two jobs, a playground generation and an audit on the same model share one copy of
each block they have in common. Every request gets its own module tree over those shared
tensors, and peft adds the request's adapter layers to that tree only: no base weight is
ever copied.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path

from django.conf import settings
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from splitcore.model.devices import DTYPES, resolve_device
from splitcore.model.part_loading import GIB, CheckpointModel, FrozenWeightStore

_lock = threading.Lock()


class BaseModelUnavailable(ValueError):
    """The requested base model is not installed in MODELS_DIR."""


def installed_models() -> list[str]:
    """Model ids present here: directories of MODELS_DIR holding a config.json."""
    root = Path(settings.MODELS_DIR)
    if not root.is_dir():
        return []
    return sorted(entry.name for entry in root.iterdir()
                  if not entry.name.startswith(".") and entry.is_dir() and (entry / "config.json").is_file())


def default_model_id() -> str | None:
    """DEFAULT_BASE_MODEL when it is installed, else the first installed model, else None."""
    models = installed_models()
    if settings.DEFAULT_BASE_MODEL in models:
        return settings.DEFAULT_BASE_MODEL
    return models[0] if models else None


def model_dir(model_id: str) -> Path:
    """The directory of an installed base model; only listed ids match, so no path escapes MODELS_DIR."""
    if model_id not in installed_models():
        raise BaseModelUnavailable(f"the base model {model_id!r} is not installed on this server "
                                   f"(looked in {settings.MODELS_DIR})")
    return (Path(settings.MODELS_DIR) / model_id).resolve()


@lru_cache(maxsize=1)
def weight_store() -> FrozenWeightStore:
    """This process's frozen weights, shared by its jobs, generations and audits."""
    return FrozenWeightStore(budget_bytes=int(settings.WORKER_MODEL_CACHE_GB * GIB))


@lru_cache(maxsize=8)
def _checkpoint_model(directory: Path, dtype: str, device: str) -> CheckpointModel:
    return CheckpointModel(directory, dtype=DTYPES[dtype], device=device, store=weight_store())


@lru_cache(maxsize=8)
def _cached_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(directory)


def client_model(model_id: str) -> CheckpointModel:
    """The parts a worker runs of ``model_id``, loaded on demand into the shared store (see the module doc)."""
    directory = model_dir(model_id)
    with _lock:
        return _checkpoint_model(directory, settings.WORKER_DTYPE, worker_device())


def tokenizer(model_id: str) -> PreTrainedTokenizerBase:
    with _lock:
        return _cached_tokenizer(model_dir(model_id))


def worker_device() -> str:
    """Where this worker computes its parts of a model: WORKER_DEVICE, checked against this machine
    (ValueError saying what to change when it has no such device)."""
    try:
        return resolve_device(settings.WORKER_DEVICE)
    except ValueError as exc:
        raise ValueError(f"WORKER_DEVICE: {exc}; an administrator must set it to a device this worker has") from exc
