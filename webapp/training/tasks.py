"""Celery tasks of the training app: they take ids (JSON) and do the work in runner.py."""

from __future__ import annotations

from celery import shared_task

from . import recovery, runner
from .services import RUN_JOB_TASK


@shared_task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: int) -> str | None:
    return runner.run_job(job_id)


@shared_task(name="training.recover_jobs")
def recover_jobs() -> dict[str, int]:
    """Beat runs this every ``JOB_SWEEP_S``: jobs of dead workers and lost messages go back to the queue."""
    return recovery.recover_jobs()
