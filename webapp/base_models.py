"""Base models and tokenizers from MODELS_DIR, loaded once per process.

A job gets a deep copy of the cached model: peft injects its LoRA layers into the
modules it is given, and the cached original must stay a clean base model.
"""

from __future__ import annotations

import copy
import threading
from functools import lru_cache
from pathlib import Path

from django.conf import settings
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from splitcore.model.devices import resolve_device

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


@lru_cache(maxsize=4)
def _cached_model(directory: Path) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(directory)
    model.requires_grad_(False)
    return model


@lru_cache(maxsize=8)
def _cached_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(directory)


def fresh_model(model_id: str) -> PreTrainedModel:
    with _lock:  # from_pretrained is not thread-safe
        return copy.deepcopy(_cached_model(model_dir(model_id)))


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
