"""Typed job events, sent to the job's channel-layer group and to its owner's job-list group.

Every event is a JSON object with a ``type``:

- ``status``: the job's name, status, phase (what it does before and between steps), trunk (and the
  links of its chain of trunks, each with its blocks and state), progress, timestamps and the server's
  clock (also sent to the job list);
- ``metric``: one training step (step, loss, lr, grad_norm, tokens_per_s, wire_bytes, elapsed_s, and the
  time it ended);
- ``eval``: one evaluation (step, val_loss);
- ``log``: one line of the job's log (id, level, message, time);
- ``done``: the job ended (status, and the download URL when it succeeded);
- ``progress``: (the job list only) a step landed: the job's step, total steps and last loss.

The job list hears ``status`` and ``progress`` of its user's jobs only (``user_jobs_group``); a
status event carries what a new row needs (dataset, base model, page URL, creation time).

The consumer replays the stored history first, so a publish that fails (Redis away) costs
a live update, never data: training goes on and the history is in the database.
"""

from __future__ import annotations

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.urls import reverse
from django.utils import timezone

from .models import Job, JobLog, MetricPoint
from .privacy import audit_summary

log = logging.getLogger(__name__)


def job_group(job_id: int) -> str:
    return f"job-{job_id}"


def user_jobs_group(user_id: int) -> str:
    return f"user-{user_id}-jobs"


def chain_entries(job: Job) -> list[dict]:
    """The trunks the job runs on, in block order, with each one's blocks and state (as the fleet page says it)."""
    return [{"number": link.number, "trunk": link.trunk_name, "blocks": link.blocks, "state": link.state}
            for link in job.chain()]


def trunk_text(job: Job, links: list[dict]) -> str | None:
    """The job's trunk in one line: "local (layers 2-3 of 6)", or the chain, link by link."""
    if len(links) > 1:
        return f"a chain of {len(links)} trunk servers: " + ", ".join(
            f"link {link['number']} {link['trunk']} {link['blocks']} ({link['state']})" for link in links)
    trunk = job.trunk
    return f"{trunk.name} (layers {trunk.layer_range})" if trunk is not None else None


def status_event(job: Job) -> dict:
    links = chain_entries(job)
    return {
        "type": "status", "job": job.pk, "name": job.display_name, "status": job.status,
        "url": reverse("training:job-detail", args=[job.pk]), "dataset_name": job.dataset_name,
        "base_model": job.base_model,
        "status_display": job.get_status_display(), "phase": job.phase, "status_line": job.status_line,
        "trunk": trunk_text(job, links), "links": links,
        "error_message": job.error_message, "cancel_requested": job.cancel_requested,
        "current_step": job.current_step, "total_steps": job.total_steps, "train_examples": job.train_examples,
        "val_examples": job.val_examples, "last_loss": job.last_loss,
        "last_val_loss": job.last_val_loss, "can_cancel": job.can_cancel, "can_resume": job.can_resume,
        "can_delete": job.is_finished,
        "created_at": job.created_at.isoformat() if job.created_at else None,
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "server_time": timezone.now().isoformat(),
        "download_url": reverse("training:job-adapter", args=[job.pk]) if job.has_adapter else None,
        "privacy": audit_summary(job),
    }


def point_event(point: MetricPoint) -> dict:
    data = point.as_dict()
    data["type"] = "metric" if point.kind == MetricPoint.Kind.TRAIN else "eval"
    del data["kind"]
    if point.kind == MetricPoint.Kind.TRAIN and point.created_at is not None:
        data["time"] = point.created_at.isoformat()  # when the step ended, for the time left
    return data


def log_event(entry: JobLog) -> dict:
    return {"type": "log", **entry.as_dict()}


def done_event(job: Job) -> dict:
    status = status_event(job)
    return {"type": "done", "job": job.pk, "status": job.status, "error_message": job.error_message,
            "download_url": status["download_url"]}


def _send(group: str, event: dict) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(group, {"type": "job.event", "event": event})
    except Exception as exc:  # noqa: BLE001 - a live update is not worth a failed job
        log.warning("could not publish a %s event to %s: %s", event.get("type"), group, exc)


def publish(job: Job, event: dict) -> None:
    _send(job_group(job.pk), event)


def publish_step(job: Job, point: MetricPoint, total_steps: int) -> None:
    """A training step landed: its point to the job's page, its progress to the owner's job list."""
    _send(job_group(job.pk), {**point_event(point), "total_steps": total_steps})
    _send(user_jobs_group(job.owner_id), {"type": "progress", "job": job.pk, "current_step": point.step,
                                          "total_steps": total_steps, "last_loss": point.loss})


def publish_status(job: Job) -> None:
    event = status_event(job)
    _send(job_group(job.pk), event)
    _send(user_jobs_group(job.owner_id), event)
    if job.is_finished:
        _send(job_group(job.pk), done_event(job))


def job_log(job: Job, message: str, level: str = JobLog.Level.INFO) -> JobLog:
    """Store a log line for the job's page and send it live."""
    entry = JobLog.objects.create(job=job, level=level, message=message)
    publish(job, log_event(entry))
    return entry
