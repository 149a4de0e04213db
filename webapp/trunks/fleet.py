"""The fleet page's data: one row per trunk with its state, jobs and last hour of health samples, and the
running jobs on chains of trunks (each link's trunk, blocks and state).

``snapshot()`` builds every row from the database; the page renders it once and the ``/ws/fleet/``
socket sends a new one whenever something a row shows changes (``publish``): after each round of
health checks, an action on the fleet page, a job starting on a trunk or ending.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.urls import reverse
from django.utils import timezone

from ..training.models import Job, JobLink
from .models import HealthSample, TrunkServer

log = logging.getLogger(__name__)

FLEET_GROUP = "fleet"
# The charts show this much history.
CHART_WINDOW_S = 3600


def snapshot(trunk_id: int | None = None) -> dict:
    """Every trunk's row (only trunk ``trunk_id``'s with one), the running jobs on chains of trunks, and the
    server's clock (the page shows how old each check is)."""
    now = timezone.now()
    trunks = TrunkServer.objects.all() if trunk_id is None else TrunkServer.objects.filter(pk=trunk_id)
    samples_since = HealthSample.objects.filter(checked_at__gte=now - timedelta(seconds=CHART_WINDOW_S))
    if trunk_id is not None:
        samples_since = samples_since.filter(trunk_id=trunk_id)
    running: dict[int, list[RunningJob]] = defaultdict(list)
    chains = []
    for job in Job.objects.filter(status=Job.Status.RUNNING).select_related("owner").with_links():
        links = job.chain()
        if not links and job.trunk_id is not None:  # connected before links were recorded
            running[job.trunk_id].append(RunningJob(job))
        for link in links:
            if link.trunk_id is not None:
                running[link.trunk_id].append(RunningJob(job, link, len(links)))
        if len(links) > 1:
            chains.append(chain_entry(job, links))
    samples = defaultdict(list)
    for sample in samples_since:
        samples[sample.trunk_id].append(sample)
    return {"type": "fleet", "server_time": now.isoformat(), "chains": chains,
            "rows": [trunk_row(trunk, running[trunk.pk], samples[trunk.pk]) for trunk in trunks]}


@dataclass(frozen=True)
class RunningJob:
    """A running job on a trunk: as link ``link.number`` of a chain of ``links`` trunks, or alone (``links`` 1)."""

    job: Job
    link: JobLink | None = None
    links: int = 1


def chain_entry(job: Job, links: list[JobLink]) -> dict:
    """A running job on a chain of trunks: the job, and each link's trunk, blocks and state."""
    return {**job_entry(RunningJob(job, links=len(links))),
            "links": [{"number": link.number, "trunk": link.trunk_name, "trunk_id": link.trunk_id,
                       "blocks": link.blocks, "state": link.state} for link in links]}


def trunk_row(trunk: TrunkServer, jobs: list[RunningJob], samples: list[HealthSample]) -> dict:
    series = chart_series(samples)
    return {
        "id": trunk.pk, "name": trunk.name, "address": trunk.address, "status": trunk.fleet_status,
        "checked_status": trunk.status, "enabled": trunk.enabled, "draining": trunk.draining,
        "draining_since": trunk.draining_since.isoformat() if trunk.draining_since else None,
        "empty": is_empty(trunk, jobs), "drain_state": drain_state(trunk, jobs),
        "model_id": trunk.model_id, "layers": trunk.layer_range,
        "device": trunk.device_summary, "memory": trunk.memory_summary,
        "active_sessions": trunk.active_sessions, "max_sessions": trunk.max_sessions,
        "latency_ms": trunk.latency_ms, "version": trunk.version,
        "last_checked_at": trunk.last_checked_at.isoformat() if trunk.last_checked_at else None,
        "last_error": trunk.last_error,
        "jobs": [job_entry(job) for job in jobs],
        "series": series, "busy_fraction": busy_fraction(samples), "tokens_per_s": _last(series["tokens_per_s"]),
        "change_url": reverse("admin:trunks_trunkserver_change", args=[trunk.pk]),
        "actions": available_actions(trunk, jobs),
    }


def available_actions(trunk: TrunkServer, jobs: list) -> list[str]:
    """The fleet page's buttons that apply to the trunk now (see actions.py)."""
    return ["check", "disable" if trunk.enabled else "enable", "end-drain" if trunk.draining else "drain",
            *(["move-jobs"] if jobs else [])]


def empty_row() -> dict:
    """A row for a trunk the page has not seen yet: fleet.js fills a copy of it."""
    return trunk_row(TrunkServer(pk=0, name="", address="", enabled=True), [], [])


def job_entry(running: RunningJob | Job) -> dict:
    """A job in a trunk's row; ``link``: "link 2 of 3" when the trunk is one link of the job's chain ("" alone)."""
    if isinstance(running, Job):
        running = RunningJob(running)
    job, link = running.job, running.link
    return {"id": job.pk, "name": job.display_name, "owner": job.owner.get_username(),
            "model": job.base_model, "status_line": job.status_line,
            "link": f"link {link.number} of {running.links}, {link.blocks}".rstrip(", ")
            if link is not None and running.links > 1 else "",
            "url": reverse("admin:training_job_change", args=[job.pk])}


def counted(number: int, noun: str) -> str:
    """The count and the noun, plural unless one: 1 job, 2 jobs, 0 sessions."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def drain_state(trunk: TrunkServer, jobs: list) -> str:
    """What a draining trunk still holds: "1 job and 2 sessions left", or that it can be stopped."""
    if is_empty(trunk, jobs):
        return "empty: safe to stop"
    return f"{counted(len(jobs), 'job')} and {counted(trunk.active_sessions or 0, 'session')} left"


def row(trunk_id: int) -> dict | None:
    """One trunk's row as ``snapshot()`` builds it (None when the trunk is gone)."""
    return next(iter(snapshot(trunk_id)["rows"]), None)


def is_empty(trunk: TrunkServer, jobs: list) -> bool:
    """No job runs on it and its last check counted no session: a drained trunk can be stopped."""
    return not jobs and not trunk.active_sessions


def chart_series(samples: list[HealthSample]) -> dict[str, list]:
    """Aligned columns for the charts: the check's time (Unix seconds), the Info round trip in ms (None
    when down) and the positions per second the trunk ran forward since the sample before (None when
    one of the two is missing a counter, or the trunk restarted in between)."""
    times, latency, throughput = [], [], []
    previous = None
    for sample in samples:
        times.append(round(sample.checked_at.timestamp(), 3))
        latency.append(sample.latency_ms if sample.up else None)
        throughput.append(_rate(previous, sample, "tokens_processed"))
        previous = sample
    return {"time": times, "latency_ms": latency, "tokens_per_s": throughput}


def busy_fraction(samples: list[HealthSample]) -> float | None:
    """The share of the window's time the trunk's blocks spent computing (None without two counted samples)."""
    busy = elapsed = 0.0
    for before, after in zip(samples, samples[1:]):
        if _same_run(before, after):
            busy += after.busy_s - before.busy_s
            elapsed += after.uptime_s - before.uptime_s
    return min(1.0, busy / elapsed) if elapsed > 0 else None


def _same_run(before: HealthSample | None, after: HealthSample) -> bool:
    """Both samples counted by one run of the trunk (it did not restart in between)."""
    return (before is not None and before.uptime_s is not None and after.uptime_s is not None
            and after.uptime_s > before.uptime_s)


def _rate(before: HealthSample | None, after: HealthSample, counter: str) -> float | None:
    if not _same_run(before, after):
        return None
    return max(0.0, (getattr(after, counter) - getattr(before, counter)) / (after.uptime_s - before.uptime_s))


def _last(values: list):
    return next((value for value in reversed(values) if value is not None), None)


def publish() -> None:
    """Send a new snapshot to every open fleet page; a failure (Redis away) costs a live update only."""
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(FLEET_GROUP, {"type": "fleet.event", "event": snapshot()})
    except Exception as exc:  # noqa: BLE001 - a live update is not worth a failed check or job
        log.warning("could not publish the fleet snapshot: %s", exc)
