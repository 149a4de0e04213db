"""Celery tasks of the training app: they take ids (JSON) and do the work in runner.py and merged.py."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from . import merged, recovery, runner
from .services import RUN_JOB_TASK


@shared_task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: int) -> str | None:
    return runner.run_job(job_id)


# Late acks: a build whose worker dies comes back, and the redelivered task ends it as failed at once
# (see merged.build). The soft limit ends a build with a message; the hard one stops a stuck one.
@shared_task(name=merged.BUILD_MERGED_TASK, acks_late=True, reject_on_worker_lost=True,
             soft_time_limit=settings.MERGED_BUILD_TIMEOUT_S, time_limit=settings.MERGED_BUILD_TIMEOUT_S + 60)
def build_merged_model(job_id: int, requested_at: str) -> str:
    return merged.build(job_id, requested_at)


@shared_task(name="training.recover_jobs")
def recover_jobs() -> dict[str, int]:
    """Beat runs this every ``JOB_SWEEP_S``: jobs of dead workers and lost messages go back to the queue."""
    return recovery.recover_jobs()


@shared_task(name="training.expire_merged")
def expire_merged() -> int:
    """Beat runs this every ``JOB_SWEEP_S``: merged models past MERGED_RETENTION_HOURS are deleted."""
    return merged.expire_merged()
