"""What users do with jobs: create, cancel, resume, delete. Views and the API call these."""

from __future__ import annotations

import logging
import shutil

from celery import signature
from django.db import transaction
from django.utils import timezone

from .. import base_models
from ..datasets.services import trains_in_chat_template
from . import events
from .models import NAME_MAX_LENGTH, Job, JobSecret

# The name tasks.py registers run_job under. Sending by name keeps this module free of an import of
# tasks.py, which imports recovery.py, which enqueues through this module.
RUN_JOB_TASK = "training.run_job"
log = logging.getLogger(__name__)


class JobStateError(Exception):
    """The job is not in a state that allows this action; the message says why."""


def enqueue(job: Job) -> None:
    """Send the job to the workers once the current transaction commits."""
    transaction.on_commit(lambda: signature(RUN_JOB_TASK, args=(job.pk,)).delay())


def default_name(dataset_name: str, when=None) -> str:
    """A job's name when its owner gives none: the dataset's name and the time, in the site's time zone."""
    stamp = timezone.localtime(when or timezone.now()).strftime("%Y-%m-%d %H:%M")
    suffix = f" · {stamp}"
    return dataset_name[: NAME_MAX_LENGTH - len(suffix)] + suffix


def trains_in_chat_format(job: Job) -> bool | None:
    """Whether the job's examples go through its base model's chat template (None when unknown here)."""
    if job.dataset is None:
        return None
    try:
        return trains_in_chat_template(job.dataset, job.base_model)
    except (base_models.BaseModelUnavailable, OSError):
        return None


def create_job(job: Job) -> Job:
    """Save a validated (unsaved) job as queued with a key of its own (``JobSecret``), and send it to the
    workers. Every job created here draws a new key, also one whose settings copy another job's."""
    job.status = Job.Status.QUEUED
    job.dataset_name = job.dataset.name if job.dataset else job.dataset_name
    job.name = job.name.strip() or default_name(job.dataset_name)
    job.chat_format = trains_in_chat_format(job)
    with transaction.atomic():
        job.save()
        JobSecret.draw(job)
        enqueue(job)
    events.job_log(job, "queued")
    events.publish_status(job)
    return job


def cancel_job(job: Job) -> Job:
    """A queued job is cancelled at once; a running one stops after its current step (keeping a checkpoint)."""
    now = timezone.now()
    if Job.objects.filter(pk=job.pk, status=Job.Status.QUEUED).update(
            status=Job.Status.CANCELLED, finished_at=now, error_message="cancelled before it started", phase="",
            updated_at=now):
        job.refresh_from_db()
        events.job_log(job, "cancelled before it started")
        events.publish_status(job)
        return job
    if not Job.objects.filter(pk=job.pk, status=Job.Status.RUNNING).update(cancel_requested=True, updated_at=now):
        job.refresh_from_db()
        raise JobStateError(f"job {job.pk} is {job.status}; only queued or running jobs can be cancelled")
    job.refresh_from_db()
    events.job_log(job, "cancel requested: stopping after the current step")
    events.publish_status(job)
    return job


def resume_job(job: Job) -> Job:
    """Queue a cancelled or failed job again; it continues from its last checkpoint."""
    if job.dataset_id is None and job.status in (Job.Status.CANCELLED, Job.Status.FAILED):
        raise JobStateError(f"job {job.pk} cannot be resumed: its dataset ({job.dataset_name}) was deleted; start a "
                            "new job with another dataset")
    with transaction.atomic():
        resumed = Job.objects.filter(pk=job.pk, status__in=[Job.Status.CANCELLED, Job.Status.FAILED]).update(
            status=Job.Status.QUEUED, cancel_requested=False, error_message="", finished_at=None, phase="",
            updated_at=timezone.now())
        job.refresh_from_db()
        if not resumed:
            raise JobStateError(f"job {job.pk} is {job.status}; only cancelled or failed jobs can be resumed")
        enqueue(job)
    events.job_log(job, "queued again: continues from the last checkpoint")
    events.publish_status(job)
    return job


def delete_job(job: Job) -> None:
    """Delete a finished job and everything it stored: its checkpoints, adapter, merged model (and any build's
    staging), metrics, logs, links and playground generations. A queued or running job is refused (cancel it
    first: it stops after its step and closes its trunk sessions). The row goes first, in one conditional
    DELETE, so a resume cannot slip in between; then the files."""
    directory = job.directory
    with transaction.atomic():
        deleted, _ = Job.objects.filter(pk=job.pk, status__in=Job.FINISHED).delete()
        if not deleted:
            job.refresh_from_db()
            raise JobStateError(f"job {job.pk} is {job.status}; cancel it first (it stops after its current step "
                                "and closes its trunk sessions), then delete it")
        transaction.on_commit(lambda: shutil.rmtree(directory, ignore_errors=True))
    log.info("deleted job %s and %s", job.pk, directory)
