"""Running one job in a worker: claim it, train through its trunk, record what happens.

A job is claimed with a conditional UPDATE (queued -> running), so a redelivered task
message never runs a job twice. A job with a checkpoint resumes from it. Metrics are
stored as rows as they happen. Errors end the job as ``failed`` with a message that
says what happened and what to do; the checkpoint stays for a resume.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time

import grpc
from django.conf import settings
from django.db.models import F
from django.utils import timezone

from splitcore.data_formats import DatasetFormatError, parse_dataset
from splitcore.training import (
    CheckpointSaved,
    EvalMetrics,
    SplitEngine,
    SplitTrainer,
    StepMetrics,
    TrainerEvent,
    TrainingDiverged,
    list_checkpoints,
)
from splitcore.training.batches import prepare_training_data
from splitcore.training.checkpoints import read_checkpoint_state
from splitcore.trunk_client import TrunkClient, TrunkError

from .. import base_models
from ..trunks.models import TrunkServer
from ..trunks.selection import NoTrunkAvailable, pick_trunk
from . import events
from .models import Job, JobLog, MetricPoint

log = logging.getLogger(__name__)

CAPACITY_POLL_S = 2.0


class JobFailed(Exception):
    """Ends a job as failed with this message for the user."""


class JobCancelled(Exception):
    """The user cancelled the job before training started (e.g. while it waited for a trunk)."""


def _cancel_requested(job: Job) -> bool:
    return Job.objects.filter(pk=job.pk, cancel_requested=True).exists()


def claim(job_id: int) -> bool:
    worker = f"{socket.gethostname()}"
    return bool(Job.objects.filter(pk=job_id, status=Job.Status.QUEUED).update(
        status=Job.Status.RUNNING, started_at=timezone.now(), finished_at=None, worker=worker,
        attempts=F("attempts") + 1, error_message="", updated_at=timezone.now(),
    ))


def run_job(job_id: int) -> str | None:
    """Run a queued job to its end; returns the final status (None when it was not claimable)."""
    if not claim(job_id):
        log.info("job %s is not queued (taken by another worker, cancelled or gone); skipping", job_id)
        return None
    job = Job.objects.get(pk=job_id)
    events.publish_status(job)
    events.job_log(job, f"started on worker {job.worker} (attempt {job.attempts})")
    try:
        status = _train(job)
    except JobFailed as failure:
        status = _finish(job, Job.Status.FAILED, str(failure))
    except JobCancelled:
        status = _finish(job, Job.Status.CANCELLED, "cancelled while it waited for a trunk server")
    except Exception as exc:  # noqa: BLE001 - any crash must end the job with a message, not leave it running
        log.exception("job %s crashed", job_id)
        status = _finish(job, Job.Status.FAILED, f"unexpected error in the worker: {type(exc).__name__}: {exc}")
    return status


def _finish(job: Job, status: str, message: str = "") -> str:
    Job.objects.filter(pk=job.pk).update(status=status, error_message=message, finished_at=timezone.now(),
                                         cancel_requested=False, updated_at=timezone.now())
    job.refresh_from_db()
    level = JobLog.Level.ERROR if status == Job.Status.FAILED else JobLog.Level.INFO
    events.job_log(job, f"{status}: {message}" if message else status, level)
    events.publish_status(job)
    return status


def _train(job: Job) -> str:
    examples = _examples(job)
    config = job.train_config()
    try:
        tokenizer = base_models.tokenizer(job.base_model)
        data = prepare_training_data(tokenizer, examples, config)
    except ValueError as exc:
        raise JobFailed(str(exc)) from exc
    total = config.total_steps(len(data.train))
    config = dataclasses.replace(config, eval_every=max(1, total // 10) if data.val else 0)
    Job.objects.filter(pk=job.pk).update(total_steps=total, train_examples=len(data.train),
                                         val_examples=len(data.val))
    job.refresh_from_db()
    events.publish_status(job)
    events.job_log(job, f"{len(data.train)} training and {len(data.val)} validation examples"
                        + (f" ({data.dropped} without a trained token dropped)" if data.dropped else "")
                        + f"; {total} steps")

    checkpoints = list_checkpoints(job.checkpoint_dir)
    resume = checkpoints[-1] if checkpoints else None
    if resume is not None:
        step = read_checkpoint_state(resume).step
        MetricPoint.objects.filter(job=job, step__gt=step).delete()
        events.job_log(job, f"resuming from the checkpoint of step {step}")

    trunk, client = _connect(job, config.wire_encoding)
    engine = _open_engine(job, config, trunk, client)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = SplitTrainer(engine, config, data, pad_id, checkpoint_dir=job.checkpoint_dir,
                           callbacks=[lambda event: _record(job, event)],
                           should_cancel=lambda: _cancel_requested(job))
    try:
        result = trainer.run(resume_from=resume)
        if result.status == "cancelled":
            return _finish(job, Job.Status.CANCELLED, f"cancelled at step {result.step} of {total}; "
                                                      "resume to continue from there")
        trainer.export_adapter(job.adapter_dir, job.base_model)
    except TrunkError as error:
        raise JobFailed(_trunk_failure(trunk, error, job)) from error
    except TrainingDiverged as exc:
        raise JobFailed(str(exc)) from exc
    except OSError as exc:
        raise JobFailed(f"could not write to {job.directory} ({exc.strerror or exc}); the previous checkpoint "
                        "is kept — free space or fix permissions, then resume") from exc
    finally:
        engine.close()
        client.close()
    return _finish(job, Job.Status.SUCCEEDED)


def _examples(job: Job):
    dataset = job.dataset
    if dataset is None:
        raise JobFailed("the dataset of this job was deleted; start a new job with another dataset")
    try:
        with dataset.file.open("rb") as handle:
            return parse_dataset(handle.read(), dataset.original_filename).examples
    except FileNotFoundError as exc:
        raise JobFailed(f"the file of dataset {dataset.name!r} is missing from the server") from exc
    except DatasetFormatError as exc:
        raise JobFailed(str(exc)) from exc


def _connect(job: Job, wire_encoding: str) -> tuple[TrunkServer, TrunkClient]:
    """The job's trunk (or the best healthy one), waiting up to TRUNK_WAIT_S for one to answer."""
    deadline = time.monotonic() + settings.TRUNK_WAIT_S
    delay = 1.0
    while True:
        try:
            trunk = job.trunk if (job.trunk is not None and not job.trunk_auto) else pick_trunk(job.base_model)
            client = trunk.client(wire_encoding, timeout_s=settings.TRUNK_RPC_TIMEOUT_S)
            try:
                client.info()
            except TrunkError:
                client.close()
                raise
            if job.trunk_id != trunk.pk:
                Job.objects.filter(pk=job.pk).update(trunk=trunk)
                job.trunk = trunk
            events.job_log(job, f"connected to the trunk server {trunk.name} (layers {trunk.layer_range})")
            return trunk, client
        except (NoTrunkAvailable, TrunkError) as error:
            if isinstance(error, TrunkError) and error.code == grpc.StatusCode.UNAUTHENTICATED:
                raise JobFailed(f"the trunk server {job.trunk or ''} refused the token; an administrator must "
                                "update it") from error
            if _cancel_requested(job):
                raise JobCancelled from error
            if time.monotonic() >= deadline:
                raise JobFailed(_unreachable(job, error)) from error
            events.job_log(job, f"waiting for a trunk server: {error}", JobLog.Level.WARNING)
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 15.0)


def _unreachable(job: Job, error: Exception) -> str:
    waited = f"after waiting {settings.TRUNK_WAIT_S:.0f} s"
    if isinstance(error, NoTrunkAvailable):
        return f"{error} ({waited})"
    trunk = job.trunk
    where = f"the trunk server {trunk.name} at {trunk.address}" if trunk else "the trunk server"
    return (f"{where} could not be reached {waited} ({error.code.name}: {error.details}); "
            "check that it is running, then resume the job")


def _open_engine(job: Job, config, trunk: TrunkServer, client: TrunkClient) -> SplitEngine:
    """Open the trunk session. A trunk at its session cap makes the job wait (until a session
    frees up or the user cancels), not fail."""
    told = False
    while True:
        try:
            return SplitEngine(base_models.fresh_model(job.base_model), config, client, label=f"job {job.pk}")
        except TrunkError as error:
            if error.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                client.close()
                raise JobFailed(_trunk_failure(trunk, error, job)) from error
            if not told:
                events.job_log(job, f"{trunk.name} is at its session capacity; waiting for a free session",
                               JobLog.Level.WARNING)
                told = True
            if _cancel_requested(job):
                client.close()
                raise JobCancelled from error
            time.sleep(CAPACITY_POLL_S)
        except ValueError as exc:  # the trunk serves another model, or the split does not fit
            client.close()
            raise JobFailed(str(exc)) from exc


def _trunk_failure(trunk: TrunkServer, error: TrunkError, job: Job) -> str:
    where = f"the trunk server {trunk.name} at {trunk.address}"
    job.refresh_from_db(fields=["current_step"])
    kept = list_checkpoints(job.checkpoint_dir)
    checkpoint = f"the checkpoint of step {read_checkpoint_state(kept[-1]).step} is kept" if kept else \
        "no checkpoint was written yet"
    if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        what = f"{where} stopped answering at step {job.current_step + 1}"
    elif error.code == grpc.StatusCode.NOT_FOUND:
        what = f"{where} lost this job's session (it restarted or the session expired)"
    elif error.code == grpc.StatusCode.UNAUTHENTICATED:
        what = f"{where} refused the token; an administrator must update it"
    else:
        what = f"{where} answered {error.code.name}: {error.details}"
    return f"{what}; {checkpoint} — resume the job when the trunk is available"


def _record(job: Job, event: TrainerEvent) -> None:
    """Store the event as a row first (the history), then send it live."""
    if isinstance(event, StepMetrics):
        point, _ = MetricPoint.objects.update_or_create(
            job=job, step=event.step, kind=MetricPoint.Kind.TRAIN, defaults=dict(
                loss=event.loss, lr=event.lr, grad_norm=event.grad_norm, tokens_per_s=event.tokens_per_s,
                wire_bytes=event.wire_bytes, elapsed_s=event.elapsed_s))
        Job.objects.filter(pk=job.pk).update(current_step=event.step, last_loss=event.loss,
                                             updated_at=timezone.now())
        events.publish(job, {**events.point_event(point), "total_steps": event.total_steps,
                             "finished_at": event.time})
    elif isinstance(event, EvalMetrics):
        point, _ = MetricPoint.objects.update_or_create(job=job, step=event.step, kind=MetricPoint.Kind.EVAL,
                                                        defaults=dict(val_loss=event.val_loss))
        Job.objects.filter(pk=job.pk).update(last_val_loss=event.val_loss)
        events.publish(job, events.point_event(point))
        events.job_log(job, f"step {event.step}: validation loss {event.val_loss:.4f}")
    elif isinstance(event, CheckpointSaved):
        log.info("job %s: checkpoint of step %s saved", job.pk, event.step)  # too frequent for the user's log
