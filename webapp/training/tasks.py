"""Celery tasks of the training app: they take ids (JSON) and do the work in runner.py."""

from __future__ import annotations

from celery import shared_task

from . import runner


@shared_task(name="training.run_job", acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: int) -> str | None:
    return runner.run_job(job_id)
