"""Datasets users upload; the file is validated before a row exists (see services.py)."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models

from ..byte_sizes import format_bytes


def dataset_upload_path(instance: Dataset, filename: str) -> str:
    # Never the user's file name on disk: it cannot escape the media directory.
    extension = instance.file_format
    return f"datasets/{instance.owner_id}/{uuid.uuid4().hex}.{extension}"


class Dataset(models.Model):
    class Format(models.TextChoices):
        JSONL = "jsonl", "JSONL"
        CSV = "csv", "CSV"
        TXT = "txt", "Plain text"

    class Kind(models.TextChoices):
        TEXT = "text", "text"
        PROMPT_COMPLETION = "prompt_completion", "prompt / completion"
        MESSAGES = "messages", "chat messages"

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="datasets")
    name = models.CharField(max_length=200)
    file = models.FileField(upload_to=dataset_upload_path, max_length=300)
    original_filename = models.CharField(max_length=255)
    file_format = models.CharField(max_length=8, choices=Format.choices)
    kind = models.CharField(max_length=20, choices=Kind.choices)
    num_examples = models.PositiveIntegerField()
    size_bytes = models.PositiveBigIntegerField()
    sha256 = models.CharField(max_length=64)
    # Token statistics per (base model, max length), computed on first view.
    stats_cache = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return self.name

    @property
    def size_words(self) -> str:
        """The file's size in binary units, as every size on the site: "3.2 KiB", "50 MiB"."""
        return format_bytes(self.size_bytes)
