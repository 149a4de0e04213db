"""Celery task: a large dataset's token statistics, counted once and cached on the dataset."""

from __future__ import annotations

import logging

from celery import shared_task

from .models import Dataset
from .services import COUNT_STATISTICS_TASK, dataset_statistics

log = logging.getLogger(__name__)


@shared_task(name=COUNT_STATISTICS_TASK)
def count_statistics(dataset_id: int, model_id: str, max_length: int) -> str:
    """Count and cache; a failed count is cached too (its message is what the page shows)."""
    dataset = Dataset.objects.filter(pk=dataset_id).first()
    if dataset is None:
        return "gone"
    try:
        dataset_statistics(dataset, model_id, max_length)
    except ValueError as exc:
        log.info("dataset %s: statistics with %s at %s failed: %s", dataset_id, model_id, max_length, exc)
        return "failed"
    return "counted"
