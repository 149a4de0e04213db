"""Staff delete a user and everything of theirs: datasets and their files, jobs and every file under their
directories (checkpoints, adapters, merged models), metrics, logs, playground answers.

A user's queued jobs are cancelled at once and their running jobs are asked to stop; while one still runs
(its worker finishes its step and closes its trunk sessions), the deletion is refused and says so, so no
worker writes a checkpoint into a directory that was just removed. The rows go in one transaction; the
files once it has committed.
"""

from __future__ import annotations

import logging
import shutil

from django.db import transaction

from ..datasets.models import Dataset
from ..training import services as jobs
from ..training.models import Job

log = logging.getLogger(__name__)


class UserBusy(Exception):
    """The user still has a running job; it was asked to stop."""


def delete_user(user) -> str:
    """Delete ``user`` with all their data; returns what was deleted, in words. UserBusy while a job runs."""
    for job in Job.objects.filter(owner=user, status__in=[Job.Status.QUEUED, Job.Status.RUNNING]):
        try:
            jobs.cancel_job(job)
        except jobs.JobStateError:
            pass  # it finished meanwhile
    running = list(Job.objects.filter(owner=user, status=Job.Status.RUNNING).values_list("pk", flat=True))
    if running:
        raise UserBusy(f"{user.get_username()} has {len(running)} running job(s) ({', '.join(map(str, running))}); "
                       "they were asked to stop after their current step: delete the user again once they stopped")
    directories = [job.directory for job in Job.objects.filter(owner=user).only("pk")]
    files = [(dataset.file.storage, dataset.file.name) for dataset in Dataset.objects.filter(owner=user)
             if dataset.file.name]
    name = user.get_username()
    with transaction.atomic():
        user.delete()  # datasets, jobs, their metrics, logs, secrets and links, generations: by cascade

        def remove_files() -> None:
            for directory in directories:
                shutil.rmtree(directory, ignore_errors=True)
            for storage, file_name in files:
                storage.delete(file_name)

        transaction.on_commit(remove_files)
    summary = f"deleted {name} with {len(files)} dataset(s) and {len(directories)} job(s), and their files"
    log.info(summary)
    return summary
