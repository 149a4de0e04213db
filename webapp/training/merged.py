"""The merged model of a succeeded job: its base model with the adapter folded in, as one zip.

A user asks for it (page or API); a worker builds it once, in the background, on the merge
queue, a queue of its own (it reads and rewrites a whole model, shard by shard: minutes for a
big one, so it must hold up neither the control queue's checks and sweeps nor the
playground's answers); the zip is kept beside the job's adapter and streamed from disk on
every download, for ``MERGED_RETENTION_HOURS`` after its build: then the sweep deletes it
(``expire_merged``), and asked for again, it is built again.

States (``Job.merged_status``): ``none`` -> ``building`` -> ``ready`` or ``failed`` (with
``merged_error``); a failed build can be asked for again. A request claims the build with a
conditional UPDATE, so asking twice builds once. ``merged_requested_at`` names the build:
the task carries it, and a task for an older request (a redelivered message) does nothing.
A build stops after ``MERGED_BUILD_TIMEOUT_S``; one still ``building`` ``JOB_STALE_AFTER_S``
after that lost its worker, and the sweep (recovery.py) or the next request ends it as
failed. A redelivered task whose build had already started means its worker died mid-build
(out of memory, most often): it fails the build at once, saying so.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from celery import signature
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from splitcore.model.merge import MergeError, merge_adapter

from .. import base_models
from ..byte_sizes import format_bytes
from . import events
from .adapter_package import base_model_origin, model_card, prompt_format, training_args
from .models import Job, JobLog
from .services import JobStateError

log = logging.getLogger(__name__)

# The name tasks.py registers the build under (sent by name, like services.RUN_JOB_TASK).
BUILD_MERGED_TASK = "training.build_merged_model"
STAGING_PREFIX = ".merged-build-"
LICENSE_FILES = ("LICENSE", "LICENSE.md", "LICENSE.txt", "LICENCE", "LICENCE.md", "LICENCE.txt")
Merged = Job.MergedStatus


def zip_name(job: Job) -> str:
    return f"merged-model-job-{job.pk}.zip"


# ------------------------------------------------------------------ asking for it


def request_merged(job: Job) -> tuple[Job, bool]:
    """Have a worker build the job's merged model unless it is built or being built.

    Returns the job (reloaded) and whether this request started a build. Raises JobStateError
    for a job that has not succeeded."""
    if job.status != Job.Status.SUCCEEDED or not job.has_adapter:
        raise JobStateError(not_succeeded_message(job))
    if job.merged_status == Merged.READY and not job.merged_zip_path.is_file():
        # The zip went missing (a cleaned disk): build it again rather than offer a dead link.
        Job.objects.filter(pk=job.pk, merged_status=Merged.READY).update(merged_status=Merged.NONE,
                                                                         merged_bytes=None)
    now = timezone.now()
    with transaction.atomic():
        started = Job.objects.filter(pk=job.pk, status=Job.Status.SUCCEEDED).filter(
            Q(merged_status__in=[Merged.NONE, Merged.FAILED]) | _stale_builds(now)).update(
            merged_status=Merged.BUILDING, merged_requested_at=now, merged_started_at=None, merged_error="",
            merged_bytes=None, merged_built_at=None)
        if started:
            transaction.on_commit(lambda: signature(BUILD_MERGED_TASK, args=(job.pk, now.isoformat())).delay())
    job.refresh_from_db()
    if started:
        events.job_log(job, "merged model requested: a worker builds it (base model + adapter in one model)")
    return job, bool(started)


def not_succeeded_message(job: Job) -> str:
    if job.status != Job.Status.SUCCEEDED:
        return f"job {job.pk} is {job.status}; only a succeeded job has a merged model (its adapter merged in)"
    return f"job {job.pk} has no adapter files any more, so there is nothing to merge"


def state(job: Job) -> dict:
    """The merged model's state as the API answers it, with a sentence saying what to do next."""
    url = reverse("api-job-merged", args=[job.pk])
    if job.status != Job.Status.SUCCEEDED:
        detail = not_succeeded_message(job)
    elif job.merged_status == Merged.READY and job.has_merged:
        detail = (f"ready: GET {url} downloads it until {job.merged_expires_at.isoformat()}, then it is deleted "
                  "(POST builds it again)")
    elif job.merged_status == Merged.BUILDING:
        detail = "a worker is building it; ask again in a while"
    elif job.merged_status == Merged.FAILED:
        detail = f"the build failed: {job.merged_error} POST {url} to try again"
    else:
        detail = f"not built yet: POST {url} to build it"
    return {
        "job": job.pk, "merged_status": job.merged_status, "merged_bytes": job.merged_bytes,
        "merged_error": job.merged_error,
        "merged_requested_at": job.merged_requested_at.isoformat() if job.merged_requested_at else None,
        "merged_expires_at": job.merged_expires_at.isoformat() if job.has_merged else None,
        "merged_url": url if job.has_merged else None, "detail": detail,
    }


# ------------------------------------------------------------------ stale builds


def _stale_cutoff(now: datetime) -> datetime:
    return now - timedelta(seconds=settings.MERGED_BUILD_TIMEOUT_S + settings.JOB_STALE_AFTER_S)


def _stale_builds(now: datetime) -> Q:
    """Builds past their time limit plus the stale margin: started long ago, or never started at all."""
    cutoff = _stale_cutoff(now)
    return Q(merged_status=Merged.BUILDING) & (
        Q(merged_started_at__lt=cutoff) | Q(merged_started_at__isnull=True, merged_requested_at__lt=cutoff))


def fail_stale_builds() -> int:
    """End as failed (to be asked for again) every build whose worker is gone; the sweep runs this."""
    failed = 0
    now = timezone.now()
    limit = settings.MERGED_BUILD_TIMEOUT_S + settings.JOB_STALE_AFTER_S
    for job in Job.objects.filter(_stale_builds(now)):
        reason = ("no worker finished it within the time limit" if job.merged_started_at
                  else "no worker started it")
        if _fail(job, job.merged_requested_at, f"{reason} ({limit:.0f} s); build it again."):
            failed += 1
    return failed


# ------------------------------------------------------------------ retention


def expire_merged() -> int:
    """Delete the merged models built more than MERGED_RETENTION_HOURS ago (the sweep runs this); each job
    goes back to "not built" and says so in its log. Returns how many were deleted."""
    cutoff = timezone.now() - timedelta(hours=settings.MERGED_RETENTION_HOURS)
    expired = 0
    old = Q(merged_built_at__lt=cutoff) | Q(merged_built_at__isnull=True, merged_requested_at__lt=cutoff)
    for job in Job.objects.filter(old, merged_status=Merged.READY):
        # Claimed by its build's name: a build asked for meanwhile is left alone.
        claimed = Job.objects.filter(pk=job.pk, merged_status=Merged.READY,
                                     merged_requested_at=job.merged_requested_at).update(
            merged_status=Merged.NONE, merged_bytes=None, merged_built_at=None)
        if not claimed:
            continue
        job.merged_zip_path.unlink(missing_ok=True)
        expired += 1
        events.job_log(job, f"the merged model was deleted {settings.MERGED_RETENTION_HOURS:g} hours after its "
                            "build (MERGED_RETENTION_HOURS); build it again to download it")
        events.publish_status(job)
    return expired


# ------------------------------------------------------------------ the build (a worker runs this)


def build(job_id: int, requested_at: str) -> str:
    """Build the merged model of request ``requested_at``; what happened, in a word (for the worker's log)."""
    token = parse_datetime(requested_at)
    job = Job.objects.filter(pk=job_id).first()
    if job is None or token is None:
        return "gone"
    ours = Job.objects.filter(pk=job_id, merged_status=Merged.BUILDING, merged_requested_at=token)
    if not ours.filter(merged_started_at__isnull=True).update(merged_started_at=timezone.now()):
        if ours.exists():  # this build started before: the message came back because its worker died
            _fail(job, token, "the worker stopped while building it (out of memory, or restarted); "
                              "build it again, or ask an administrator for a worker with more memory.")
            return "failed"
        return "stale"  # a newer request took over, or this one ended
    job.refresh_from_db()
    events.job_log(job, "building the merged model")
    for leftover in job.directory.glob(f"{STAGING_PREFIX}*"):  # of a build whose worker was killed
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=job.directory))
    try:
        archive = _build_zip(job, staging)
        size = archive.stat().st_size
        with transaction.atomic():
            if not ours.update(merged_status=Merged.READY, merged_bytes=size, merged_error="",
                               merged_built_at=timezone.now()):
                return "stale"  # failed by the sweep meanwhile, or asked for again: this result is not wanted
            os.replace(archive, job.merged_zip_path)  # before the commit: whoever sees "ready" finds the file
    except SoftTimeLimitExceeded:
        _fail(job, token, f"it took longer than the time limit ({settings.MERGED_BUILD_TIMEOUT_S:.0f} s, "
                          "MERGED_BUILD_TIMEOUT_S); an administrator can raise it.")
        return "failed"
    except (MergeError, base_models.BaseModelUnavailable) as exc:
        _fail(job, token, f"{exc}.")
        return "failed"
    except Exception as exc:  # noqa: BLE001 - any error ends the build with its reason, never "building" forever
        log.exception("merged model of job %s failed", job_id)
        _fail(job, token, f"{type(exc).__name__}: {exc}. Build it again; if it fails the same way, the "
                          "worker's log has the details.")
        return "failed"
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    job.refresh_from_db()
    events.job_log(job, f"merged model ready to download ({format_bytes(size)})")
    return "ready"


def _build_zip(job: Job, staging: Path) -> Path:
    """Merge into ``staging``/model and pack it with its model card; returns the zip (in ``staging``)."""
    base_dir = base_models.model_dir(job.base_model)
    model_dir = merge_adapter(base_dir, job.adapter_dir, staging / "model")
    archive = staging / "merged.zip"
    # Stored, not deflated: safetensors weights do not compress, and storing streams at disk speed.
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as bundle:
        for path in sorted(model_dir.rglob("*")):
            if path.is_file():
                bundle.write(path, arcname=path.relative_to(model_dir).as_posix())
        licenses = [base_dir / name for name in LICENSE_FILES if (base_dir / name).is_file()]
        for path in licenses:
            bundle.write(path, arcname=path.name)
        bundle.writestr("README.md", model_card_merged(job, [path.name for path in licenses]))
        bundle.writestr("training_args.json", json.dumps(training_args(job), indent=2))
    return archive


def _fail(job: Job, token: datetime | None, reason: str) -> bool:
    """End build ``token`` of ``job`` as failed with ``reason``, unless it ended otherwise meanwhile."""
    if not Job.objects.filter(pk=job.pk, merged_status=Merged.BUILDING, merged_requested_at=token).update(
            merged_status=Merged.FAILED, merged_error=reason):
        return False
    job.refresh_from_db()
    events.job_log(job, f"the merged model could not be built: {reason}", JobLog.Level.WARNING)
    return True


# ------------------------------------------------------------------ the model card


def model_card_merged(job: Job, license_files: Sequence[str] = ()) -> str:
    """README.md of the merged model: what it is, its license, how to load it, and the adapter card's
    sections on the dataset, the result, privacy and the hyper-parameters."""
    adapter_card = model_card(job)
    # From "Base model" (which published model the local weights copy, and how they were made) to "Use it".
    start, end = adapter_card.find("## Base model"), adapter_card.find("## Use it")
    sections = adapter_card[start:end].strip() + "\n\n" if 0 <= start < end else ""
    included = (f" Its license file{'s are' if len(license_files) > 1 else ' is'} included: "
                + ", ".join(f"`{name}`" for name in license_files) + "." if license_files else "")
    hub_id = base_model_origin(job.base_model).get("hub_id")
    front = f"base_model: {hub_id}\nbase_model_relation: merge\n" if hub_id else ""
    return f"""---
{front}library_name: transformers
tags:
- merged
- split-learning
---

# {job.display_name}: {job.base_model} with its fine-tuned adapter merged in (job {job.pk})

This is the base model {job.base_model} with the adapter of job {job.pk} merged into its
weights: an ordinary model directory (safetensors weights in the base model's dtype, its
config, generation config and tokenizer) that loads without peft. The adapter was
fine-tuned with split learning: the data owner's worker ran the embeddings, the first and the
last decoder blocks and the LM head; a trunk server ran the middle blocks and saw only hidden
states and their gradients (see Privacy).

## License

These weights are derived from {job.base_model}: the base model's license and terms of use
apply to this model.{included}

## Use it

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/unzipped/directory")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/unzipped/directory")
```

{prompt_format(job)}

The adapter alone (far smaller; it loads onto the base model with `PeftModel.from_pretrained`)
is the job's other download. `training_args.json` holds every setting of the run.

{sections}"""
