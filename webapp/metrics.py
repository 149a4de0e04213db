"""``/metrics``: Prometheus's text exposition of the app's state, for staff only.

Everything but the WebSocket count is read when Prometheus scrapes, by ``StudioCollector``
on the module's own registry (not prometheus_client's global one, whose process and
platform metrics are left out): rows per status from the database, the Celery queues'
lengths from the broker Redis, and what the last health check recorded of each trunk.
The open WebSockets are counted by the consumers themselves (``live.OPEN_SOCKETS``).

Staff authenticate with their session or a DRF token (``Authorization: Token <key>``);
everyone else, a wrong token included, gets 404, so that the page does not reveal itself.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db.models import Count
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseNotAllowed
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from kombu.transport.redis import PRIORITY_STEPS, Channel
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from rest_framework.authentication import SessionAuthentication, TokenAuthentication
from rest_framework.exceptions import APIException
from rest_framework.request import Request

from .datasets.models import Dataset
from .live import OPEN_SOCKETS
from .playground.models import Generation
from .training.models import Job
from .trunks.models import TrunkServer

logger = logging.getLogger(__name__)

PREFIX = "splitlearn_"
# A scrape waits at most this long for the broker before it answers without the queues.
BROKER_TIMEOUT_S = 2.0


def _status_counts(name: str, documentation: str, model, statuses) -> GaugeMetricFamily:
    """Rows of ``model`` per status, every status present (0 when none has it)."""
    family = GaugeMetricFamily(PREFIX + name, documentation, labels=["status"])
    counts = dict(model.objects.values_list("status").annotate(n=Count("pk")).order_by())
    for status in statuses:
        family.add_metric([status], counts.get(status, 0))
    return family


def queue_names() -> list[str]:
    """The Celery queues the workers consume, and Celery's default queue (where unrouted tasks land)."""
    return list(dict.fromkeys((*settings.ALL_QUEUES, settings.CELERY_TASK_DEFAULT_QUEUE)))


def priority_keys(queue: str) -> list[str]:
    """The Redis lists holding ``queue``'s messages: kombu's Redis transport keeps one list per priority
    step, the queue's own name for priority 0 and ``<queue>\\x06\\x16<step>`` for the others."""
    steps = settings.CELERY_BROKER_TRANSPORT_OPTIONS.get("priority_steps", PRIORITY_STEPS)
    return [f"{queue}{Channel.sep}{step}" if step else queue for step in steps]


def queue_lengths(broker_url: str) -> dict[str, int] | None:
    """Messages waiting per queue, or None when the broker cannot be reached."""
    client = redis.Redis.from_url(broker_url, socket_connect_timeout=BROKER_TIMEOUT_S,
                                  socket_timeout=BROKER_TIMEOUT_S)
    names = queue_names()
    try:
        with client.pipeline(transaction=False) as pipe:
            for name in names:
                for key in priority_keys(name):
                    pipe.llen(key)
            lengths = iter(pipe.execute())
    except (redis.RedisError, OSError) as exc:
        logger.warning("metrics: the Celery broker cannot be reached, so no queue lengths: %s", exc)
        return None
    finally:
        client.close()
    return {name: sum(next(lengths) for _key in priority_keys(name)) for name in names}


class StudioCollector(Collector):
    """The app's state, read afresh at every scrape."""

    def collect(self) -> Iterator[Metric]:
        yield _status_counts("jobs", "Training jobs per status.", Job, Job.Status.values)
        yield _status_counts("generations", "Playground generations per status.", Generation,
                             Generation.Status.values)
        yield GaugeMetricFamily(PREFIX + "users", "User accounts.", value=get_user_model().objects.count())
        yield GaugeMetricFamily(PREFIX + "datasets", "Uploaded datasets.", value=Dataset.objects.count())
        yield from self.broker()
        yield from self.trunks()

    def broker(self) -> Iterator[Metric]:
        lengths = queue_lengths(settings.CELERY_BROKER_URL)
        yield GaugeMetricFamily(PREFIX + "broker_up", "1 when the Celery broker answered this scrape.",
                                value=int(lengths is not None))
        if lengths is None:
            return
        family = GaugeMetricFamily(PREFIX + "celery_queue_length", "Messages waiting in a Celery queue.",
                                   labels=["queue"])
        for queue, length in lengths.items():
            family.add_metric([queue], length)
        yield family

    def trunks(self) -> Iterator[Metric]:
        """What the last health check recorded of each trunk; a value it did not record is left out."""
        labels = ["trunk", "model"]

        def gauge(name: str, documentation: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + "trunk_" + name, documentation, labels=labels)

        up = gauge("up", "1 when the trunk's last health check found it up.")
        enabled = gauge("enabled", "1 when jobs may be sent to the trunk.")
        draining = gauge("draining", "1 while the trunk is drained: no new sessions, running jobs go on.")
        latency = gauge("latency_seconds", "How long the trunk's last health check took.")
        active = gauge("active_sessions", "Sessions open on the trunk at its last health check.")
        limit = gauge("max_sessions", "Sessions the trunk accepts at once.")
        age = gauge("last_check_age_seconds", "Time since the trunk's last health check.")
        now = timezone.now()
        for trunk in TrunkServer.objects.all():
            values = [trunk.name, trunk.model_id]
            up.add_metric(values, int(trunk.status == TrunkServer.Status.UP))
            enabled.add_metric(values, int(trunk.enabled))
            draining.add_metric(values, int(trunk.draining))
            if trunk.latency_ms is not None:
                latency.add_metric(values, trunk.latency_ms / 1000)
            if trunk.active_sessions is not None:
                active.add_metric(values, trunk.active_sessions)
            if trunk.max_sessions is not None:
                limit.add_metric(values, trunk.max_sessions)
            if trunk.last_checked_at is not None:
                age.add_metric(values, (now - trunk.last_checked_at).total_seconds())
        yield from (up, enabled, draining, latency, active, limit, age)


REGISTRY = CollectorRegistry()
REGISTRY.register(StudioCollector())
REGISTRY.register(OPEN_SOCKETS)


def is_staff(request: HttpRequest) -> bool:
    """Whether the request comes from a staff user, by their session or their API token."""
    api_request = Request(request, authenticators=[SessionAuthentication(), TokenAuthentication()])
    try:
        user = api_request.user
    except APIException:  # a wrong or inactive user's token
        return False
    return bool(user and user.is_active and user.is_staff)


@csrf_exempt  # it changes nothing; without this a POST would meet a CSRF 403 and reveal the page
def metrics_view(request: HttpRequest) -> HttpResponse:
    if not is_staff(request):
        raise Http404
    if request.method not in ("GET", "HEAD"):
        return HttpResponseNotAllowed(["GET", "HEAD"])
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
