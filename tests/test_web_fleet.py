"""The fleet page: who may see it, its rows (state, jobs, health samples and the charts' series),
its actions, the live socket, and the samples' retention. A real trunk process answers the checks;
the drain and move of running jobs are in test_web_faults.py (real workers)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import Permission
from django.urls import reverse
from django.utils import timezone
from trunk_process import start_trunk

from splitcore.remote.proto import trunk_pb2 as pb
from webapp.training.models import Job
from webapp.trunks import fleet
from webapp.trunks.consumers import FleetConsumer
from webapp.trunks.health import ProbeResult, check_trunk, record
from webapp.trunks.models import HealthSample, TrunkServer

pytestmark = pytest.mark.django_db

MODEL_ID = "llama"


@pytest.fixture(scope="module")
def trunk_process(tiny_dirs, tmp_path_factory):
    process = start_trunk(tiny_dirs["llama"], tmp_path_factory.mktemp("fleet-trunk"), "--max-sessions", "3")
    yield process
    process.stop()


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_superuser("boss", password="boss-pass-123456")


@pytest.fixture
def staff_client(client, staff):
    client.force_login(staff)
    return client


def make_trunk(name: str, **fields) -> TrunkServer:
    defaults = dict(address=f"{name}.example:50051", token=f"token-of-{name}-0000", status=TrunkServer.Status.UP,
                    model_id=MODEL_ID, max_sessions=4, active_sessions=0, latency_ms=5.0)
    return TrunkServer.objects.create(name=name, **{**defaults, **fields})


def info(**counters) -> pb.InfoResponse:
    return pb.InfoResponse(model_id=MODEL_ID, model_type="llama", num_layers=6, trunk_start=2, trunk_end=4,
                           hidden_size=64, dtype="float32", max_sessions=4, active_sessions=1, version="1",
                           **counters)


def running_job(owner, trunk: TrunkServer, **fields) -> Job:
    return Job.objects.create(owner=owner, dataset_name="sums", base_model=MODEL_ID, status=Job.Status.RUNNING,
                              trunk=trunk, name=fields.pop("name", "sums run"), **fields)


def row_of(name: str) -> dict:
    return next(row for row in fleet.snapshot()["rows"] if row["name"] == name)


# ------------------------------------------------------------------ access


def test_only_staff_see_the_page_and_its_actions(client, owner, staff):
    trunk = make_trunk("a")
    page, drain = reverse("trunks:fleet"), reverse("trunks:fleet-action", args=[trunk.pk, "drain"])
    for user in (None, owner):
        if user is not None:
            client.force_login(user)
        assert client.get(page).status_code == 404
        assert client.post(drain).status_code == 404
    trunk.refresh_from_db()
    assert not trunk.draining
    client.force_login(staff)
    response = client.get(page)
    assert response.status_code == 200 and b'data-trunk="%d"' % trunk.pk in response.content


def test_staff_without_the_change_permission_see_the_page_but_no_buttons(client, django_user_model):
    viewer = django_user_model.objects.create_user("viewer", password="viewer-pass-1234", is_staff=True)
    trunk = make_trunk("a")
    client.force_login(viewer)
    html = client.get(reverse("trunks:fleet")).content.decode()
    assert "data-trunk" in html and 'data-action="drain"' not in html
    assert client.post(reverse("trunks:fleet-action", args=[trunk.pk, "drain"])).status_code == 403
    viewer.user_permissions.add(Permission.objects.get(codename="change_trunkserver"))
    client.force_login(django_user_model.objects.get(pk=viewer.pk))
    assert client.post(reverse("trunks:fleet-action", args=[trunk.pk, "drain"])).status_code == 302
    trunk.refresh_from_db()
    assert trunk.draining


def test_an_unknown_action_or_trunk_is_404(staff_client):
    trunk = make_trunk("a")
    assert staff_client.post(reverse("trunks:fleet-action", args=[trunk.pk, "explode"])).status_code == 404
    assert staff_client.post(reverse("trunks:fleet-action", args=[trunk.pk + 99, "drain"])).status_code == 404


# ------------------------------------------------------------------ rows


def test_rows_say_disabled_draining_up_or_down_and_which_buttons_apply(owner):
    make_trunk("up")
    make_trunk("down", status=TrunkServer.Status.DOWN, last_error="cannot reach down.example:50051")
    make_trunk("off", enabled=False)
    busy = make_trunk("emptying", draining=True, draining_since=timezone.now(), active_sessions=1)
    running_job(owner, busy)

    assert [(row["name"], row["status"]) for row in fleet.snapshot()["rows"]] == [
        ("down", "down"), ("emptying", "draining"), ("off", "disabled"), ("up", "up")]
    assert row_of("up")["actions"] == ["check", "disable", "drain"]
    assert row_of("off")["actions"] == ["check", "enable", "drain"]
    assert row_of("emptying")["actions"] == ["check", "disable", "end-drain", "move-jobs"]
    assert row_of("down")["last_error"] == "cannot reach down.example:50051"
    emptying = row_of("emptying")
    assert not emptying["empty"]
    assert [(job["name"], job["owner"]) for job in emptying["jobs"]] == [("sums run", "owner")]
    assert emptying["jobs"][0]["url"] == reverse("admin:training_job_change", args=[emptying["jobs"][0]["id"]])

    Job.objects.update(status=Job.Status.SUCCEEDED)
    assert not row_of("emptying")["empty"]  # its last check still counted a session
    TrunkServer.objects.filter(name="emptying").update(active_sessions=0)
    assert row_of("emptying")["empty"]


def test_samples_give_the_latency_and_throughput_series_and_survive_a_restart():
    trunk = make_trunk("a")
    start = timezone.now() - timedelta(minutes=10)
    checks = [  # (seconds after start, up, uptime, tokens, busy)
        (0, True, 100.0, 1000, 10.0),
        (30, True, 130.0, 4000, 25.0),   # 3000 tokens in 30 s: 100/s; busy 15 of 30 s
        (60, False, None, None, None),   # down: no latency, no rate
        (90, True, 20.0, 500, 1.0),      # restarted: its counters began again, no rate across the restart
        (120, True, 50.0, 2000, 16.0),   # 1500 in 30 s: 50/s; busy 15 of 30 s
    ]
    for offset, up, uptime, tokens, busy in checks:
        HealthSample.objects.create(trunk=trunk, checked_at=start + timedelta(seconds=offset), up=up,
                                    latency_ms=2.0 + offset / 30 if up else None, uptime_s=uptime,
                                    tokens_processed=tokens, busy_s=busy)
    HealthSample.objects.create(trunk=trunk, checked_at=start - timedelta(hours=2), up=True, latency_ms=99.0)

    row = row_of("a")
    series = row["series"]
    assert len(series["time"]) == 5, "only the last hour is charted"
    assert series["latency_ms"] == [2.0, 3.0, None, 5.0, 6.0]
    assert series["tokens_per_s"] == [None, pytest.approx(100.0), None, None, pytest.approx(50.0)]
    assert row["tokens_per_s"] == pytest.approx(50.0)
    assert row["busy_fraction"] == pytest.approx(0.5)


def test_each_check_of_a_real_trunk_stores_a_sample_with_its_counters(trunk_process, settings):
    trunk = TrunkServer.objects.create(name="real", address=trunk_process.address, token=trunk_process.token)
    check_trunk(trunk)
    check_trunk(trunk)
    first, second = HealthSample.objects.filter(trunk=trunk)
    assert first.up and second.up and second.latency_ms > 0
    assert (second.active_sessions, second.max_sessions) == (0, 3)
    assert second.uptime_s > first.uptime_s > 0 and second.tokens_processed == 0 and second.busy_s >= 0
    assert second.memory_sessions_bytes is not None

    TrunkServer.objects.filter(pk=trunk.pk).update(address="127.0.0.1:9")
    trunk.refresh_from_db()
    check_trunk(trunk)
    down = HealthSample.objects.filter(trunk=trunk).last()
    assert not down.up and down.latency_ms is None and down.uptime_s is None


def test_samples_older_than_the_retention_are_deleted_as_new_ones_come_in(settings):
    settings.TRUNK_HEALTH_RETENTION_S = 3600
    trunk, other = make_trunk("a"), make_trunk("b")
    now = timezone.now()
    for target in (trunk, other):
        for age in (7200, 3000):
            HealthSample.objects.create(trunk=target, checked_at=now - timedelta(seconds=age), up=True)
    record(trunk, ProbeResult(info=info(uptime_s=5.0, tokens_processed=7, busy_s=0.5, sessions_opened=1),
                              latency_ms=1.5))
    ages = sorted(round((now - sample.checked_at).total_seconds()) for sample in HealthSample.objects.all())
    assert ages == [-0, 3000, 3000] or ages == [0, 3000, 3000]
    newest = HealthSample.objects.filter(trunk=trunk).last()
    assert (newest.tokens_processed, newest.busy_s, newest.sessions_opened, newest.latency_ms) == (7, 0.5, 1, 1.5)


def test_a_trunk_from_before_the_counters_stores_none_for_them():
    trunk = make_trunk("old")
    record(trunk, ProbeResult(info=info(), latency_ms=2.0))
    sample = HealthSample.objects.get(trunk=trunk)
    assert sample.up and sample.latency_ms == 2.0 and sample.active_sessions == 1
    assert (sample.uptime_s, sample.tokens_processed, sample.busy_s) == (None, None, None)


# ------------------------------------------------------------------ actions


def post_action(client, trunk: TrunkServer, action: str) -> str:
    response = client.post(reverse("trunks:fleet-action", args=[trunk.pk, action]), follow=True)
    assert response.redirect_chain == [(reverse("trunks:fleet"), 302)]
    return response.content.decode()


def test_check_now_checks_the_trunk_and_says_what_it_found(staff_client, trunk_process):
    trunk = TrunkServer.objects.create(name="real", address=trunk_process.address, token=trunk_process.token)
    html = post_action(staff_client, trunk, "check")
    trunk.refresh_from_db()
    assert trunk.status == "up" and f"Trunk real: up, {trunk.latency_ms:.1f} ms, model {MODEL_ID}" in html
    assert "sessions 0/3" in html and trunk_process.token not in html

    broken = make_trunk("broken", address="127.0.0.1:9", status=TrunkServer.Status.UNKNOWN)
    html = post_action(staff_client, broken, "check")
    broken.refresh_from_db()
    assert broken.status == "down" and "Trunk broken: down: cannot reach 127.0.0.1:9" in html


def test_disable_enable_drain_and_end_the_drain(staff_client, owner):
    trunk = make_trunk("a")
    running_job(owner, trunk)
    html = post_action(staff_client, trunk, "disable")
    assert "Trunk a is disabled: no new jobs and no health checks. Its 1 running job goes on." in html
    assert row_of("a")["status"] == "disabled"
    post_action(staff_client, trunk, "enable")
    assert row_of("a")["status"] == "up"

    html = post_action(staff_client, trunk, "drain")
    assert "Trunk a is draining: no new sessions open there; its 1 running job goes on (or move it)" in html
    trunk.refresh_from_db()
    assert trunk.draining and trunk.draining_since is not None and row_of("a")["status"] == "draining"
    html = post_action(staff_client, trunk, "end-drain")
    assert "Trunk a takes new sessions again." in html
    trunk.refresh_from_db()
    assert not trunk.draining and trunk.draining_since is None


def test_an_action_asked_for_json_answers_with_the_outcome_and_the_new_row(staff_client, owner):
    trunk = make_trunk("a", active_sessions=1)
    running_job(owner, trunk)
    url = reverse("trunks:fleet-action", args=[trunk.pk, "drain"])
    answer = staff_client.post(url, headers={"Accept": "application/json"}).json()
    assert answer["ok"] and answer["message"].startswith("Trunk a is draining")
    assert answer["row"]["status"] == "draining" and answer["row"]["drain_state"] == "1 job and 1 session left"
    assert "end-drain" in answer["row"]["actions"] and "drain" not in answer["row"]["actions"]

    missing = staff_client.post(reverse("trunks:fleet-action", args=[trunk.pk + 99, "drain"]),
                                headers={"Accept": "application/json"})
    assert missing.status_code == 404 and missing.json() == {
        "ok": False, "message": f"Trunk server {trunk.pk + 99} is gone: it was removed meanwhile."}


def test_an_action_asked_for_json_without_the_permission_is_refused_in_json(client, django_user_model):
    viewer = django_user_model.objects.create_user("viewer", password="viewer-pass-1234", is_staff=True)
    trunk = make_trunk("a")
    client.force_login(viewer)
    refused = client.post(reverse("trunks:fleet-action", args=[trunk.pk, "drain"]),
                          headers={"Accept": "application/json"})
    assert refused.status_code == 403 and not refused.json()["ok"]
    assert "needs the permission to change them" in refused.json()["message"]
    trunk.refresh_from_db()
    assert not trunk.draining


def test_the_drain_state_counts_jobs_and_sessions_in_words(owner):
    trunk = make_trunk("a", draining=True, active_sessions=2)
    assert row_of("a")["drain_state"] == "0 jobs and 2 sessions left"
    running_job(owner, trunk)
    running_job(owner, trunk, name="second")
    assert row_of("a")["drain_state"] == "2 jobs and 2 sessions left"
    TrunkServer.objects.filter(pk=trunk.pk).update(active_sessions=1)
    Job.objects.filter(name="second").update(status=Job.Status.SUCCEEDED)
    assert row_of("a")["drain_state"] == "1 job and 1 session left"
    Job.objects.update(status=Job.Status.SUCCEEDED)
    TrunkServer.objects.filter(pk=trunk.pk).update(active_sessions=0)
    assert row_of("a")["drain_state"] == "empty: safe to stop"


def test_a_disabled_trunk_is_neither_checked_nor_chosen_until_enabled(staff_client, trunk_process):
    from webapp.trunks.selection import NoTrunkAvailable, pick_trunk
    from webapp.trunks.tasks import check_all

    trunk = TrunkServer.objects.create(name="real", address=trunk_process.address, token=trunk_process.token)
    assert check_all() == {"up": 1, "down": 0}
    post_action(staff_client, trunk, "disable")
    checked = TrunkServer.objects.get(pk=trunk.pk).last_checked_at
    assert check_all() == {"up": 0, "down": 0}
    assert TrunkServer.objects.get(pk=trunk.pk).last_checked_at == checked
    with pytest.raises(NoTrunkAvailable):
        pick_trunk(MODEL_ID)
    post_action(staff_client, trunk, "enable")
    assert check_all() == {"up": 1, "down": 0}
    assert TrunkServer.objects.get(pk=trunk.pk).last_checked_at > checked
    assert pick_trunk(MODEL_ID) == trunk


def test_a_draining_trunk_gets_no_new_work(staff_client):
    from webapp.trunks.selection import NoTrunkAvailable, pick_trunk, served_models

    trunk = make_trunk("only")
    assert pick_trunk(MODEL_ID) == trunk
    post_action(staff_client, trunk, "drain")
    with pytest.raises(NoTrunkAvailable, match="only, the only trunk server up for llama, is draining for "
                                               "maintenance: it takes no new sessions"):
        pick_trunk(MODEL_ID)
    assert MODEL_ID not in served_models()


def test_move_jobs_asks_each_running_job_to_move_when_another_trunk_can_take_it(staff_client, owner):
    source, target = make_trunk("source"), make_trunk("target")
    make_trunk("other-model", model_id="gpt2")
    moving = running_job(owner, source, name="sums")
    finished = running_job(owner, source, name="done")
    Job.objects.filter(pk=finished.pk).update(status=Job.Status.SUCCEEDED)

    html = post_action(staff_client, source, "move-jobs")
    assert f"Moving off source: job {moving.pk} (sums) to target." in html
    moving.refresh_from_db()
    finished.refresh_from_db()
    assert moving.move_from == source and finished.move_from is None
    assert moving.status_line == "Moving to another trunk server after the current step…"

    Job.objects.filter(pk=moving.pk).update(move_from=None)
    TrunkServer.objects.filter(pk=target.pk).update(status=TrunkServer.Status.DOWN)
    html = post_action(staff_client, source, "move-jobs")
    assert f"job {moving.pk} (sums) stays: no healthy trunk serves &#x27;{MODEL_ID}&#x27; besides source" in html
    moving.refresh_from_db()
    assert moving.move_from is None

    Job.objects.filter(pk=moving.pk).update(status=Job.Status.SUCCEEDED)
    assert "No job runs on trunk source: nothing to move." in post_action(staff_client, source, "move-jobs")


# ------------------------------------------------------------------ live


@pytest.mark.django_db(transaction=True)
def test_the_socket_sends_a_snapshot_then_each_change(staff, owner, redis_server):
    trunk = make_trunk("a")

    async def connect(user):
        # The consumer itself, with the user the session middleware would set (access by session: the
        # socket table in test_web_isolation.py).
        communicator = WebsocketCommunicator(FleetConsumer.as_asgi(), "/ws/fleet/")
        communicator.scope["user"] = user
        connected, code = await communicator.connect(timeout=10)
        return communicator, connected, code

    def drain_and_publish():
        TrunkServer.objects.filter(pk=trunk.pk).update(draining=True)
        fleet.publish()

    async def scenario():
        _, connected, code = await connect(owner)
        assert (connected, code) == (False, 4404)
        socket, connected, _ = await connect(staff)
        assert connected
        try:
            first = await socket.receive_json_from(timeout=10)
            assert first["type"] == "fleet" and [row["status"] for row in first["rows"]] == ["up"]
            await sync_to_async(drain_and_publish)()
            update = await socket.receive_json_from(timeout=10)
            assert [(row["name"], row["status"], row["empty"]) for row in update["rows"]] == [("a", "draining", True)]
        finally:
            await socket.disconnect()

    async_to_sync(scenario)()
