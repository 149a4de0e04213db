"""Jobs nobody is running any more: a worker that died, a task message a Redis restart lost.

``recover_jobs`` (beat, every ``JOB_SWEEP_S``) queues again every running job whose lease went
stale (see lease.py); it continues from its last checkpoint on the next free worker. A job
whose user asked to cancel it is cancelled instead. Queued jobs that no worker has taken for
``JOB_REDISPATCH_S`` get their task message sent again; a duplicate is harmless, since only
one claim can succeed. Merged-model builds whose worker died end as failed (merged.py).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from . import events
from .lease import release_stale, stale_jobs
from .merged import fail_stale_builds
from .models import Job, JobLog
from .services import enqueue

log = logging.getLogger(__name__)


def recover_jobs() -> dict[str, int]:
    counts = {"requeued": 0, "cancelled": 0, "redispatched": 0}
    for job in stale_jobs():
        silent = f"its worker {job.worker or '?'} stopped answering (no heartbeat for " \
                 f"{settings.JOB_STALE_AFTER_S:.0f} s)"
        if job.cancel_requested:
            if release_stale(job, status=Job.Status.CANCELLED, finished_at=timezone.now(), cancel_requested=False,
                             error_message=f"cancelled; {silent}"):
                _tell(job, f"cancelled: {silent}", JobLog.Level.WARNING)
                counts["cancelled"] += 1
        elif release_stale(job):
            _tell(job, f"{silent}; queued again, it continues from its last checkpoint", JobLog.Level.WARNING)
            enqueue(job)
            counts["requeued"] += 1
    cutoff = timezone.now() - timedelta(seconds=settings.JOB_REDISPATCH_S)
    for job in Job.objects.filter(status=Job.Status.QUEUED, updated_at__lt=cutoff):
        if Job.objects.filter(pk=job.pk, status=Job.Status.QUEUED, updated_at=job.updated_at).update(
                updated_at=timezone.now()):
            enqueue(job)
            counts["redispatched"] += 1
    if any(counts.values()):
        log.info("job recovery: %s", counts)
    # Merged-model builds whose worker is gone end as failed, to be asked for again (merged.py).
    if stale_builds := fail_stale_builds():
        log.info("merged-model recovery: %s builds of dead workers failed", stale_builds)
    return counts


def _tell(job: Job, message: str, level: str) -> None:
    job.refresh_from_db()
    events.job_log(job, message, level)
    events.publish_status(job)
