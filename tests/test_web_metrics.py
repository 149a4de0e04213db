"""``/metrics``: staff only (404 for everyone else), Prometheus's text format, counts from the
database, queue lengths from a real broker Redis (and ``broker_up 0`` without one), trunks,
and the open WebSockets counted through the real ASGI application."""

from __future__ import annotations

import logging
from datetime import timedelta

import kombu
import pytest
import redis
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client
from django.utils import timezone
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from rest_framework.authtoken.models import Token

from webapp.asgi import application
from webapp.live import ListeningConsumer
from webapp.metrics import queue_names
from webapp.playground.models import Generation
from webapp.processes import free_port
from webapp.routing import websocket_urlpatterns
from webapp.training.models import Job
from webapp.trunks.models import TrunkServer

pytestmark = pytest.mark.django_db

BROKER_DB = 15  # the session's Redis, in a database of its own: no worker consumes these queues
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(autouse=True)
def fast_passwords(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_user("staff", password="staff-pass-123", is_staff=True)


@pytest.fixture(autouse=True)
def broker(settings, redis_server) -> redis.Redis:
    """An empty broker Redis that the settings point at."""
    settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{redis_server.port}/{BROKER_DB}"
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def client_for(user=None, token: str | None = None) -> Client:
    client = Client(HTTP_AUTHORIZATION=f"Token {token}") if token else Client()
    if user is not None:
        client.force_login(user)
    return client


def scrape(client: Client) -> Samples:
    """Every sample of a successful scrape: (name, sorted labels) -> value."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.content[:300]
    assert response["Content-Type"] == CONTENT_TYPE_LATEST
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.content.decode())
            for sample in family.samples}


def labelled(samples: Samples, name: str, label: str) -> dict[str, float]:
    """The samples of ``name``, by the value of their one label ``label``."""
    return {dict(labels)[label]: value for (sample, labels), value in samples.items() if sample == name}


# ---------------------------------------------------------------- access


def test_everyone_but_staff_gets_not_found(owner, staff):
    Token.objects.create(user=owner)
    staff_token = Token.objects.create(user=staff)
    refused = {
        "anonymous": client_for(),
        "non-staff session": client_for(owner),
        "non-staff token": client_for(token=owner.auth_token.key),
        "wrong token": client_for(token="0" * 40),
        "malformed token header": client_for(token="two words"),
    }
    for who, client in refused.items():
        for method in ("get", "post"):
            assert getattr(client, method)("/metrics").status_code == 404, f"{who} {method}"
    staff.is_active = False
    staff.save()
    assert client_for(token=staff_token.key).get("/metrics").status_code == 404, "an inactive staff user's token"


def test_staff_get_the_text_format_by_session_or_token(staff):
    token = Token.objects.create(user=staff)
    for client in (client_for(staff), client_for(token=token.key)):
        samples = scrape(client)
        assert samples[("splitlearn_users", ())] == 1
        assert samples[("splitlearn_broker_up", ())] == 1
    assert client_for(token=token.key).post("/metrics").status_code == 405


# ---------------------------------------------------------------- database counts


def test_jobs_and_generations_per_status(owner, other, staff):
    job_statuses = {"queued": 2, "running": 1, "failed": 3}
    for status, count in job_statuses.items():
        for _ in range(count):
            Job.objects.create(owner=owner, dataset_name="sums", base_model="tiny-llama", max_steps=2, status=status)
    Generation.objects.create(owner=other, base_model="tiny-llama", prompt="hi", status=Generation.Status.STOPPED)
    samples = scrape(client_for(staff))
    assert labelled(samples, "splitlearn_jobs", "status") == {
        status: job_statuses.get(status, 0) for status in Job.Status.values}
    assert labelled(samples, "splitlearn_generations", "status") == {
        status: int(status == "stopped") for status in Generation.Status.values}
    assert samples[("splitlearn_users", ())] == 3
    assert samples[("splitlearn_datasets", ())] == 0


def test_trunks_as_their_last_check_recorded_them(staff):
    checked = timezone.now() - timedelta(seconds=30)
    TrunkServer.objects.create(name="a", address="a:1", token="t" * 24, status=TrunkServer.Status.UP,
                               model_id="tiny-llama", latency_ms=250.0, active_sessions=1, max_sessions=4,
                               last_checked_at=checked)
    TrunkServer.objects.create(name="b", address="b:1", token="t" * 24, enabled=False, draining=True)  # never checked
    samples = scrape(client_for(staff))
    a, b = (("model", "tiny-llama"), ("trunk", "a")), (("model", ""), ("trunk", "b"))
    assert (samples[("splitlearn_trunk_up", a)], samples[("splitlearn_trunk_up", b)]) == (1, 0)
    assert (samples[("splitlearn_trunk_enabled", a)], samples[("splitlearn_trunk_enabled", b)]) == (1, 0)
    assert (samples[("splitlearn_trunk_draining", a)], samples[("splitlearn_trunk_draining", b)]) == (0, 1)
    assert samples[("splitlearn_trunk_latency_seconds", a)] == pytest.approx(0.25)
    assert samples[("splitlearn_trunk_active_sessions", a)] == 1
    assert samples[("splitlearn_trunk_max_sessions", a)] == 4
    assert 30 <= samples[("splitlearn_trunk_last_check_age_seconds", a)] < 90
    assert not [key for key in samples if key[1] == b and key[0] not in ("splitlearn_trunk_up",
                                                                          "splitlearn_trunk_enabled",
                                                                          "splitlearn_trunk_draining")]


# ---------------------------------------------------------------- the broker


def test_queue_lengths_count_every_priority_of_a_queue(staff, broker, settings):
    training, generation = queue_names()[:2]
    with kombu.Connection(settings.CELERY_BROKER_URL) as connection:
        producer = connection.Producer()
        queue = kombu.Queue(training, routing_key=training)
        for priority in (0, 0, 4, 9):  # as Celery sends them: priorities land in lists of their own
            producer.publish({"n": priority}, exchange=queue.exchange, routing_key=training, declare=[queue],
                             priority=priority)
    assert len([key for key in broker.keys(f"{training}*") if broker.type(key) == b"list"]) > 1
    broker.lpush(generation, "raw message")
    samples = scrape(client_for(staff))
    assert samples[("splitlearn_broker_up", ())] == 1
    assert labelled(samples, "splitlearn_celery_queue_length", "queue") == {
        name: {training: 4, generation: 1}.get(name, 0) for name in queue_names()}


def test_an_unreachable_broker_is_reported_not_fatal(staff, settings, caplog):
    settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="webapp.metrics"):
        samples = scrape(client_for(staff))
    assert samples[("splitlearn_broker_up", ())] == 0
    assert not labelled(samples, "splitlearn_celery_queue_length", "queue")
    assert samples[("splitlearn_users", ())] == 1, "the rest of the scrape is still there"
    assert "broker cannot be reached" in caplog.text


# ---------------------------------------------------------------- WebSockets


def test_every_socket_route_names_its_label():
    routes = [entry.callback.consumer_class.metrics_route for entry in websocket_urlpatterns]
    assert ListeningConsumer.metrics_route not in routes, "a consumer without its own metrics_route"
    assert len(set(routes)) == len(routes), routes


def socket_headers(user) -> list[tuple[bytes, bytes]]:
    client = client_for(user)
    return [(b"origin", b"http://127.0.0.1"), (b"host", b"127.0.0.1"),
            (b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode())]


@pytest.mark.django_db(transaction=True)
def test_open_job_sockets_are_counted_until_they_close(owner, other, staff):
    job = Job.objects.create(owner=owner, dataset_name="sums", base_model="tiny-llama", max_steps=2)
    staff_client = client_for(staff)
    path = f"/ws/jobs/{job.pk}/"

    def open_sockets() -> dict[str, float]:
        return labelled(scrape(staff_client), "splitlearn_websocket_connections", "route")

    async def scenario():
        before = await sync_to_async(open_sockets)()
        assert {"jobs", "job", "generation"} <= set(before), "every route is shown before its first socket"
        refused = WebsocketCommunicator(application, path, headers=await sync_to_async(socket_headers)(other))
        assert (await refused.connect(timeout=10)) == (False, 4404)
        watcher = WebsocketCommunicator(application, path, headers=await sync_to_async(socket_headers)(owner))
        assert (await watcher.connect(timeout=10))[0]
        during = await sync_to_async(open_sockets)()
        assert during == {**before, "job": before["job"] + 1}, "the refused socket is not counted"
        await watcher.disconnect()
        assert await sync_to_async(open_sockets)() == before

    async_to_sync(scenario)()
