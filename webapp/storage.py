"""What each user stores on this site, against their quota (``USER_STORAGE_QUOTA_MB``).

A user's storage is their datasets' files and everything under their jobs' directories
(checkpoints, the adapter, the merged model's zip, staging of a build). It is counted from the
disk when asked (a page, the API, a check before an upload or a new job), so it is never out
of date with what deletion freed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError

from .byte_sizes import format_bytes
from .datasets.models import Dataset
from .training.models import Job


@dataclass(frozen=True)
class StorageUsage:
    datasets_bytes: int
    jobs_bytes: int
    quota_bytes: int | None  # None: no quota

    @property
    def total_bytes(self) -> int:
        return self.datasets_bytes + self.jobs_bytes

    @property
    def full(self) -> bool:
        return self.quota_bytes is not None and self.total_bytes >= self.quota_bytes

    def words(self) -> str:
        """"1.2 GiB of 10 GiB (datasets 3 MiB, jobs 1.2 GiB)", or without a quota "1.2 GiB (…)"."""
        quota = f" of {format_bytes(self.quota_bytes)}" if self.quota_bytes is not None else ""
        return (f"{format_bytes(self.total_bytes)}{quota} (datasets {format_bytes(self.datasets_bytes)}, "
                f"jobs {format_bytes(self.jobs_bytes)})")

    def to_dict(self) -> dict:
        return {"datasets_bytes": self.datasets_bytes, "jobs_bytes": self.jobs_bytes,
                "total_bytes": self.total_bytes, "quota_bytes": self.quota_bytes, "full": self.full,
                "detail": self.words()}


def quota_bytes() -> int | None:
    return settings.USER_STORAGE_QUOTA_MB * 1024 * 1024 if settings.USER_STORAGE_QUOTA_MB else None


def directory_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist); a file removed meanwhile counts 0."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def usage(user) -> StorageUsage:
    datasets = sum(Dataset.objects.filter(owner=user).values_list("size_bytes", flat=True))
    jobs = sum(directory_bytes(job.directory) for job in Job.objects.filter(owner=user).only("pk"))
    return StorageUsage(datasets_bytes=datasets, jobs_bytes=jobs, quota_bytes=quota_bytes())


def check_room(user, more_bytes: int, what: str, field: str = "file") -> None:
    """ValidationError (on ``field``) when storing ``more_bytes`` more would take ``user`` past their quota."""
    current = usage(user)
    if current.quota_bytes is None or current.total_bytes + more_bytes <= current.quota_bytes:
        return
    raise ValidationError({field: [
        f"{what} ({format_bytes(more_bytes)}) would bring your storage to "
        f"{format_bytes(current.total_bytes + more_bytes)}, over your quota of {format_bytes(current.quota_bytes)} "
        f"(you store {current.words()}); delete datasets or jobs you no longer need"]})


def check_not_full(user) -> None:
    """ValidationError when ``user`` is at or past their quota (a new job would write checkpoints)."""
    current = usage(user)
    if current.full:
        raise ValidationError(f"your storage is full: {current.words()}; a job writes checkpoints and an adapter, "
                              "so delete datasets or jobs you no longer need before starting another")
