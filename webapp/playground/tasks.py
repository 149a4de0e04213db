"""Celery tasks of the playground: they take ids (JSON) and do the work in runner.py."""

from __future__ import annotations

from celery import shared_task

from . import recovery, runner


@shared_task(name="playground.generate", acks_late=True, reject_on_worker_lost=True)
def generate(generation_id: int) -> str | None:
    return runner.run_generation(generation_id)


@shared_task(name="playground.recover_generations")
def recover_generations() -> int:
    """Beat runs this every ``JOB_SWEEP_S``: generations whose worker died end as failed."""
    return recovery.fail_orphaned()
