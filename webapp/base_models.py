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

_lock = threading.Lock()


def model_dir(model_id: str) -> Path:
    """The directory of a base model; ValueError for unknown ids (and never a path outside MODELS_DIR)."""
    root = Path(settings.MODELS_DIR)
    if not model_id or "/" in model_id or "\\" in model_id or model_id in (".", ".."):
        raise ValueError(f"unknown base model {model_id!r}")
    directory = root / model_id
    if not (directory / "config.json").is_file():
        raise ValueError(f"the base model {model_id!r} is not installed on this worker (looked in {root})")
    return directory


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
