"""Celery tasks of the playground: they take ids (JSON) and do the work in runner.py."""

from __future__ import annotations

from celery import shared_task

from . import runner


@shared_task(name="playground.generate", acks_late=True, reject_on_worker_lost=True)
def generate(generation_id: int) -> str | None:
    return runner.run_generation(generation_id)
