"""The demo dataset of the README's walkthrough (webapp/demo/lighthouse_keeper.jsonl), for any user.

`make run` adds it for the admin; every other user adds it with one click on the datasets page. Both
go through ``add_demo_dataset``, which stores it like an upload (same checks, same quota).
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

from django.core.files.base import ContentFile

from .models import Dataset
from .services import create_dataset

DEMO_FILE = Path(__file__).resolve().parent.parent / "demo" / "lighthouse_keeper.jsonl"
DEMO_NAME = "Lighthouse keeper (demo)"


@cache
def _demo_sha256() -> str:
    return hashlib.sha256(DEMO_FILE.read_bytes()).hexdigest()


def demo_dataset_of(user) -> Dataset | None:
    """The user's copy of the demo dataset (by its content, whatever its name), or None."""
    return Dataset.objects.filter(owner=user, sha256=_demo_sha256()).order_by("created_at", "id").first()


def add_demo_dataset(user) -> Dataset:
    """The user's demo dataset: the one they have, or a new copy. A refusal (the user's dataset count or
    storage quota) raises ``ValidationError`` as an upload would."""
    existing = demo_dataset_of(user)
    if existing is not None:
        return existing
    return create_dataset(user, ContentFile(DEMO_FILE.read_bytes(), name=DEMO_FILE.name), DEMO_NAME)
