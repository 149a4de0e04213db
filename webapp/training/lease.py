"""Which worker runs a job: a lease taken by a conditional UPDATE and kept alive by heartbeats.

``claim`` turns a queued job into a running one with a fresh token; only the worker holding
that token may renew the lease, record the job's end or keep training. A thread renews the
lease every ``JOB_HEARTBEAT_S``. When a worker dies (kill -9, a lost machine), its lease
goes stale and ``requeue_stale`` (run by beat) queues the job again, so another worker
continues from the last checkpoint. A worker that was only frozen and comes back finds its
token gone and stops without writing anything: a job never runs twice at once.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
from datetime import timedelta

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection
from django.db.models import F, Q
from django.utils import timezone

from .models import Job

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """Another worker owns the job now (this one was taken for dead); stop without writing."""


def claim(job_id: int) -> str | None:
    """Take a queued job: returns the lease token, or None when the job is not queued."""
    token = secrets.token_hex(16)
    now = timezone.now()
    taken = Job.objects.filter(pk=job_id, status=Job.Status.QUEUED).update(
        status=Job.Status.RUNNING, started_at=now, finished_at=None, worker=socket.gethostname(),
        attempts=F("attempts") + 1, error_message="", lease_token=token, heartbeat_at=now, updated_at=now,
    )
    return token if taken else None


class Lease:
    """The lease of one running job, renewed by a background thread while training goes on."""

    def __init__(self, job_id: int, token: str, interval_s: float | None = None) -> None:
        self.job_id = job_id
        self.token = token
        self.interval_s = settings.JOB_HEARTBEAT_S if interval_s is None else interval_s
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def mine(self):
        """The job's row, only while this lease holds it (for conditional updates)."""
        return Job.objects.filter(pk=self.job_id, lease_token=self.token, status=Job.Status.RUNNING)

    def renew(self) -> bool:
        """Record a heartbeat; False (and ``lost``) once another worker holds the job."""
        if not self.mine().update(heartbeat_at=timezone.now()):
            self.lost = True
        return not self.lost

    def cancel_requested(self) -> bool:
        """True when the user asked to cancel; raises LeaseLost when the job is not ours."""
        return self.requests()[0]

    def interrupted(self) -> bool:
        """Polled between steps: the job should stop after this step (cancel, or a move to another trunk)."""
        cancel, move_from = self.requests()
        return cancel or move_from is not None

    def requests(self) -> tuple[bool, int | None]:
        """(cancel requested, id of the trunk to move off) from the job's row, in one query."""
        row = self.mine().values_list("cancel_requested", "move_from").first()
        if row is None:
            self.lost = True
        if self.lost:
            raise LeaseLost(f"job {self.job_id} was taken over by another worker")
        return bool(row[0]), row[1]

    def __enter__(self) -> Lease:
        self._thread = threading.Thread(target=self._beat, name=f"lease-job-{self.job_id}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _beat(self) -> None:
        try:
            while not self._stop.wait(self.interval_s) and not self.lost:
                try:
                    close_old_connections()
                    self.renew()
                except DatabaseError as exc:  # the database is away for a moment: try again next beat
                    log.warning("job %s: could not renew the lease: %s", self.job_id, exc)
        finally:
            connection.close()


def _stale() -> Q:
    cutoff = timezone.now() - timedelta(seconds=settings.JOB_STALE_AFTER_S)
    return Q(status=Job.Status.RUNNING) & (Q(heartbeat_at__lt=cutoff)
                                           | Q(heartbeat_at__isnull=True, started_at__lt=cutoff))


def stale_jobs():
    """Running jobs whose worker stopped renewing its lease."""
    return Job.objects.filter(_stale())


def release_stale(job: Job, **changes) -> bool:
    """End the lease of a job whose worker died (queued again, or ``changes``); False when
    its worker renewed the lease meanwhile."""
    changes = {"status": Job.Status.QUEUED, **changes}
    return bool(Job.objects.filter(_stale(), pk=job.pk, lease_token=job.lease_token).update(
        lease_token="", worker="", phase="", updated_at=timezone.now(), **changes))
