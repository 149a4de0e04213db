"""WebSocket consumers: they authenticate, authorise, replay the stored history, then forward.

``/ws/jobs/<id>/``: for the job's owner only. On connect: the job's status, every stored
metric and evaluation (only those after ``?after=STEP`` on a reconnect) in frames of at most
``HISTORY_PAGE`` points, and the log tail (after ``?log_after=ID``), then live events from the
job's group. The group is joined
before the history is read, so nothing published in between is lost; clients drop
repeated points by step.

``/ws/jobs/``: the user's jobs only: each one's status changes (a new job's first one too, so the list
can add its row) and a progress event per training step.

Refusals close with 4401 (not logged in) or 4404 (no such job of this user).
"""

from __future__ import annotations

from channels.db import database_sync_to_async

from ..live import NOT_FOUND, ListeningConsumer
from . import events
from .models import Job, JobLog, MetricPoint

LOG_TAIL = 200
# Metric points per history frame: a long job's history goes out in several frames, not one huge one.
HISTORY_PAGE = 500


def _int_param(query: str, name: str) -> int | None:
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if key == name:
            try:
                return int(value)
            except ValueError:
                return None
    return None


class JobConsumer(ListeningConsumer):
    metrics_route = "job"
    job_event = ListeningConsumer.forward

    async def connect(self) -> None:
        user = await self.logged_in_user()
        if user is None:
            return
        self.job_id = self.scope["url_route"]["kwargs"]["job_id"]
        if not await self._owns_job(user, self.job_id):
            await self.close(code=NOT_FOUND)
            return
        await self.join(events.job_group(self.job_id))
        await self.accept()
        query = self.scope.get("query_string", b"").decode()
        for event in await self._history(_int_param(query, "after"), _int_param(query, "log_after")):
            await self.send_json(event)

    @database_sync_to_async
    def _owns_job(self, user, job_id: int) -> bool:
        return Job.objects.filter(pk=job_id, owner=user).exists()

    @database_sync_to_async
    def _history(self, after: int | None, log_after: int | None) -> list[dict]:
        """The status, then the history in frames of at most HISTORY_PAGE points (the log tail in the
        first); each frame says whether ``more`` follow."""
        job = Job.objects.get(pk=self.job_id)
        points = MetricPoint.objects.filter(job=job).order_by("step", "kind")
        if after is not None:
            points = points.filter(step__gt=after)
        logs = JobLog.objects.filter(job=job)
        logs = logs.filter(pk__gt=log_after) if log_after is not None else logs.order_by("-id")[:LOG_TAIL]
        metrics = [events.point_event(p) for p in points]
        pages = [metrics[start:start + HISTORY_PAGE] for start in range(0, len(metrics), HISTORY_PAGE)] or [[]]
        frames = [{"type": "history", "metrics": page, "logs": [], "more": index < len(pages) - 1}
                  for index, page in enumerate(pages)]
        frames[0]["logs"] = sorted((events.log_event(entry) for entry in logs), key=lambda e: e["id"])
        return [events.status_event(job), *frames]


class JobListConsumer(ListeningConsumer):
    metrics_route = "jobs"
    job_event = ListeningConsumer.forward

    async def connect(self) -> None:
        user = await self.logged_in_user()
        if user is None:
            return
        await self.join(events.user_jobs_group(user.pk))
        await self.accept()
