"""A user's recent comparisons: each prompt they asked, and the generations that answered it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db.models import Prefetch
from django.urls import reverse

from ..ownership import owned
from .models import Generation

HISTORY_SIZE = 20


@dataclass(frozen=True)
class Comparison:
    """The base model's generation and those started with it (an adapter's), in that order."""

    generations: list[Generation]

    @property
    def first(self) -> Generation:
        return self.generations[0]

    @property
    def prompt(self) -> str:
        return self.first.prompt

    @property
    def created_at(self) -> datetime:
        return self.first.created_at

    @property
    def subject(self) -> str:
        """The job's name when an adapter answered too, else the base model."""
        job = next((generation.job for generation in self.generations if generation.job_id is not None), None)
        return job.display_name if job is not None else self.first.base_model

    @property
    def ids(self) -> list[int]:
        return [generation.pk for generation in self.generations]

    @property
    def url(self) -> str:
        return f"{reverse('playground:index')}?ids={','.join(str(pk) for pk in self.ids)}"


def recent_comparisons(user, limit: int = HISTORY_SIZE) -> list[Comparison]:
    """The user's ``limit`` most recent comparisons, newest first."""
    partners = Prefetch("paired", queryset=Generation.objects.select_related("job").order_by("id"))
    firsts = (owned(Generation, user).filter(paired_with__isnull=True).select_related("job")
              .prefetch_related(partners)[:limit])
    return [Comparison([first, *first.paired.all()]) for first in firsts]
