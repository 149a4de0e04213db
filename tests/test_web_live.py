"""The WebSocket consumers, through the real ASGI application and a real Redis channel layer:
authentication, ownership, replay of the stored history, ``?after=``, live forwarding."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client

from webapp.asgi import application
from webapp.training import events
from webapp.training.models import Job, JobLog, MetricPoint

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def job(owner, redis_server):
    job = Job.objects.create(owner=owner, dataset_name="sums", base_model="tiny-llama", max_steps=10,
                             status=Job.Status.RUNNING, current_step=5, total_steps=10)
    for step in range(1, 6):
        MetricPoint.objects.create(job=job, step=step, kind="train", loss=3.0 - step / 10, lr=1e-3, grad_norm=1.0,
                                   tokens_per_s=100.0, wire_bytes=1000, elapsed_s=step * 0.5)
    MetricPoint.objects.create(job=job, step=5, kind="eval", val_loss=2.5)
    for text in ("queued", "started"):
        JobLog.objects.create(job=job, message=text)
    return job


def headers_for(user) -> list[tuple[bytes, bytes]]:
    headers = [(b"origin", b"http://127.0.0.1"), (b"host", b"127.0.0.1")]
    if user is not None:
        client = Client()
        client.force_login(user)
        headers.append((b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode()))
    return headers


def communicator(path: str, headers) -> WebsocketCommunicator:
    return WebsocketCommunicator(application, path, headers=headers)


async def receive_all(comm: WebsocketCommunicator, count: int) -> list[dict]:
    return [await comm.receive_json_from(timeout=10) for _ in range(count)]


def test_anonymous_and_other_users_are_refused(job, other, redis_server):
    anonymous, intruder = headers_for(None), headers_for(other)

    async def scenario():
        for headers, code in ((anonymous, 4401), (intruder, 4404)):
            comm = communicator(f"/ws/jobs/{job.pk}/", headers)
            connected, close_code = await comm.connect(timeout=10)
            assert not connected and close_code == code
        comm = communicator("/ws/jobs/", anonymous)
        connected, close_code = await comm.connect(timeout=10)
        assert not connected and close_code == 4401
        foreign_origin = WebsocketCommunicator(application, f"/ws/jobs/{job.pk}/",
                                               headers=[(b"origin", b"http://evil.example")])
        connected, _ = await foreign_origin.connect(timeout=10)
        assert not connected, "a page from another origin cannot open the socket"

    async_to_sync(scenario)()


def test_connect_sends_status_then_the_whole_history(job, owner, redis_server):
    headers = headers_for(owner)

    async def scenario():
        comm = communicator(f"/ws/jobs/{job.pk}/", headers)
        connected, _ = await comm.connect(timeout=10)
        assert connected
        status, history = await receive_all(comm, 2)
        assert status["type"] == "status" and status["status"] == "running" and status["total_steps"] == 10
        expected = [("metric", step) for step in range(1, 5)] + [("eval", 5), ("metric", 5)]
        assert [(p["type"], p["step"]) for p in history["metrics"]] == expected
        assert history["metrics"][0]["loss"] == pytest.approx(2.9)
        assert [entry["message"] for entry in history["logs"]] == ["queued", "started"]
        await comm.disconnect()

    async_to_sync(scenario)()


def test_reconnect_with_after_gets_only_what_was_missed(job, owner, redis_server):
    last_log = JobLog.objects.filter(job=job).order_by("id").first().pk
    headers = headers_for(owner)

    async def scenario():
        comm = communicator(f"/ws/jobs/{job.pk}/?after=3&log_after={last_log}", headers)
        assert (await comm.connect(timeout=10))[0]
        _, history = await receive_all(comm, 2)
        assert sorted({p["step"] for p in history["metrics"]}) == [4, 5]
        assert [entry["message"] for entry in history["logs"]] == ["started"]
        await comm.disconnect()

    async_to_sync(scenario)()


def test_live_events_reach_the_owner_only(job, owner, other, redis_server):
    mine, theirs = headers_for(owner), headers_for(other)

    async def scenario():
        watcher = communicator(f"/ws/jobs/{job.pk}/", mine)
        assert (await watcher.connect(timeout=10))[0]
        await receive_all(watcher, 2)
        owner_list = communicator("/ws/jobs/", mine)
        other_list = communicator("/ws/jobs/", theirs)
        assert (await owner_list.connect(timeout=10))[0] and (await other_list.connect(timeout=10))[0]

        point = await sync_to_async(MetricPoint.objects.create)(
            job=job, step=6, kind="train", loss=2.2, lr=1e-3, grad_norm=0.5, tokens_per_s=90.0, wire_bytes=900,
            elapsed_s=3.0)
        await sync_to_async(events.publish)(job, events.point_event(point))
        live = await watcher.receive_json_from(timeout=10)
        assert live == {"type": "metric", "step": 6, "loss": 2.2, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 90.0,
                        "wire_bytes": 900, "elapsed_s": 3.0, "time": point.created_at.isoformat()}

        await sync_to_async(Job.objects.filter(pk=job.pk).update)(status=Job.Status.CANCELLED)
        fresh = await sync_to_async(Job.objects.get)(pk=job.pk)
        await sync_to_async(events.publish_status)(fresh)
        assert (await watcher.receive_json_from(timeout=10))["status"] == "cancelled"
        assert (await watcher.receive_json_from(timeout=10))["type"] == "done"
        listed = await owner_list.receive_json_from(timeout=10)
        assert listed["type"] == "status" and listed["job"] == job.pk and listed["status"] == "cancelled"
        assert await other_list.receive_nothing(timeout=0.5), "another user's list hears nothing"
        for comm in (watcher, owner_list, other_list):
            await comm.disconnect()

    async_to_sync(scenario)()


def test_an_idle_socket_stays_up_past_the_redis_read_timeouts(job, owner, redis_server):
    """A page with nothing to show for a while keeps its socket: the consumer's blocking Redis reads
    (5 s each) must not hit the client's socket timeout, which would kill the consumer."""
    from channels.layers import channel_layers

    channel_layers.backends.clear()  # a layer of this event loop, built with the project's settings
    headers = headers_for(owner)

    async def scenario():
        watcher = communicator(f"/ws/jobs/{job.pk}/", headers)
        assert (await watcher.connect(timeout=10))[0]
        await receive_all(watcher, 2)
        # Several blocking reads' worth of silence; a dying consumer raises out of receive_nothing.
        assert await watcher.receive_nothing(timeout=17, interval=0.5)
        point = await sync_to_async(MetricPoint.objects.create)(
            job=job, step=6, kind="train", loss=2.2, lr=1e-3, grad_norm=0.5, tokens_per_s=90.0, wire_bytes=900,
            elapsed_s=3.0)
        await sync_to_async(events.publish)(job, events.point_event(point))
        assert (await watcher.receive_json_from(timeout=10))["step"] == 6
        await watcher.disconnect()

    async_to_sync(scenario)()


def test_a_long_history_comes_in_frames_and_the_api_pages_it(job, owner, redis_server, monkeypatch):
    from webapp.training import consumers

    for step in range(6, 13):
        MetricPoint.objects.create(job=job, step=step, kind="train", loss=2.0, lr=1e-3)
    monkeypatch.setattr(consumers, "HISTORY_PAGE", 5)
    stored = [(p.kind, p.step) for p in MetricPoint.objects.filter(job=job).order_by("step", "kind")]
    assert len(stored) == 13
    headers = headers_for(owner)

    async def scenario():
        comm = communicator(f"/ws/jobs/{job.pk}/", headers)
        assert (await comm.connect(timeout=10))[0]
        status, *frames = await receive_all(comm, 4)
        assert status["type"] == "status" and [frame["type"] for frame in frames] == ["history"] * 3
        assert [len(frame["metrics"]) for frame in frames] == [5, 5, 3]
        assert [frame["more"] for frame in frames] == [True, True, False]
        assert [len(frame["logs"]) for frame in frames] == [2, 0, 0], "the log tail comes once, first"
        assert [("train" if p["type"] == "metric" else "eval", p["step"])
                for frame in frames for p in frame["metrics"]] == stored
        assert await comm.receive_nothing(timeout=0.5)
        await comm.disconnect()

    async_to_sync(scenario)()

    client = Client()
    client.force_login(owner)
    first = client.get(f"/api/jobs/{job.pk}/metrics/?limit=5").json()
    assert first["count"] == 13 and len(first["results"]) == 5 and first["next"]
    pages, url = [], f"/api/jobs/{job.pk}/metrics/?limit=5"
    while url:
        page = client.get(url).json()
        pages.append(page["results"])
        url = page["next"]
    assert [len(page) for page in pages] == [5, 5, 3]
    assert [(p["kind"], p["step"]) for page in pages for p in page] == stored
    assert len(client.get(f"/api/jobs/{job.pk}/metrics/").json()["results"]) == 13, "1000 by default"
    after = client.get(f"/api/jobs/{job.pk}/metrics/?after=10").json()
    assert [p["step"] for p in after["results"]] == [11, 12] and after["count"] == 2
