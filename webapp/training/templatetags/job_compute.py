"""``{{ job|compute_words }}``: the job page's sentence on the split of each step's compute (training/compute.py)."""

from __future__ import annotations

from django import template

from ..compute import job_compute_words
from ..models import Job

register = template.Library()


@register.filter
def compute_words(job: Job) -> str:
    return job_compute_words(job)
