"""Generations nobody is running any more: their worker died mid-answer.

A generation stops by itself after ``GENERATION_TIMEOUT_S``; one still ``running``
``JOB_STALE_AFTER_S`` after that lost its worker. ``fail_orphaned`` (beat, every
``JOB_SWEEP_S``) ends it as failed, keeping the text it had streamed, so the page stops
waiting. A late answer from a worker that was only slow is then dropped (see runner._finish).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from . import events
from .models import Generation

log = logging.getLogger(__name__)


def fail_orphaned() -> int:
    cutoff = timezone.now() - timedelta(seconds=settings.GENERATION_TIMEOUT_S + settings.JOB_STALE_AFTER_S)
    failed = 0
    for generation in Generation.objects.filter(status=Generation.Status.RUNNING, started_at__lt=cutoff):
        message = ("its worker stopped before it finished (no answer within the time limit of "
                   f"{settings.GENERATION_TIMEOUT_S:.0f} s); the text so far is kept — try again")
        if Generation.objects.filter(pk=generation.pk, status=Generation.Status.RUNNING).update(
                status=Generation.Status.FAILED, error_message=message, finished_at=timezone.now()):
            generation.refresh_from_db()
            events.publish(generation.pk, events.done_event(generation))
            failed += 1
    if failed:
        log.info("generation recovery: %s orphaned generations failed", failed)
    return failed
