"""Trunk servers in the web app: health checks against real trunk processes, the Celery
tasks, trunk selection, served models, the admin (token never shown) and the JSON API."""

from __future__ import annotations

import json
import re
from concurrent import futures
from datetime import UTC, datetime

import grpc
import pytest
from django.urls import reverse
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from trunk_process import start_trunk

from splitcore.remote.proto import trunk_pb2 as pb
from splitcore.remote.trunk import SessionNeeds
from webapp.byte_sizes import format_bytes
from webapp.trunks.health import ProbeResult, check_trunk, record
from webapp.trunks.models import TrunkServer
from webapp.trunks.selection import NoTrunkAvailable, healthy_trunks, pick_trunk, served_models
from webapp.trunks.tasks import check_all, check_one

pytestmark = pytest.mark.django_db

MODEL_ID = "llama"  # the tiny model directory's name, which the trunk reports as its model id
SECRET = "never-show-this-token-7f3a9c1e5b"
MiB, GiB = 2**20, 2**30


@pytest.fixture(scope="module")
def trunk_process(tiny_dirs, tmp_path_factory):
    process = start_trunk(tiny_dirs["llama"], tmp_path_factory.mktemp("trunk-logs"), "--max-sessions", "4",
                          "--max-lora-rank", "32")
    yield process
    process.stop()


@pytest.fixture
def live_trunk(trunk_process) -> TrunkServer:
    return TrunkServer.objects.create(name="live", address=trunk_process.address, token=trunk_process.token)


def make_trunk(name: str, *, status=TrunkServer.Status.UP, model_id=MODEL_ID, max_sessions=4, active=0,
               latency=10.0, enabled=True, max_lora_rank=None) -> TrunkServer:
    return TrunkServer.objects.create(
        name=name, address=f"{name}.example:50051", token=f"token-of-{name}", status=status, model_id=model_id,
        max_sessions=max_sessions, active_sessions=active, latency_ms=latency, enabled=enabled,
        max_lora_rank=max_lora_rank,
    )


# ------------------------------------------------------------------ health checks


def test_check_marks_a_running_trunk_up_with_its_info(live_trunk):
    trunk = check_trunk(live_trunk)
    trunk.refresh_from_db()
    assert trunk.status == TrunkServer.Status.UP and trunk.last_error == ""
    assert trunk.model_id == MODEL_ID and trunk.model_type == "llama"
    assert (trunk.num_layers, trunk.trunk_start, trunk.trunk_end) == (6, 2, 4)
    assert trunk.layer_range == "2-3 of 6"
    assert trunk.hidden_size == 64 and trunk.max_sessions == 4 and trunk.active_sessions == 0
    assert trunk.free_sessions == 4
    assert len(trunk.weights_fingerprint) == 64 and trunk.version
    assert trunk.latency_ms > 0 and trunk.last_checked_at is not None
    assert (trunk.device, trunk.dtype, trunk.max_lora_rank) == ("cpu", "float32", 32)
    assert trunk.memory_total_bytes > trunk.memory_base_bytes > 0 and trunk.memory_sessions_bytes is not None
    assert trunk.max_positions > 0 and trunk.max_micro_batches > 0 and trunk.max_tokens_per_request > 0
    assert trunk.max_kv_tokens > 0 and trunk.max_saved_graphs > 0


def reported_info(**fields) -> pb.InfoResponse:
    """An Info reply of the tiny model's trunk as one from before the device and budget fields sends it;
    ``fields`` adds or overrides some."""
    older = dict(model_id=MODEL_ID, model_type="llama", num_layers=6, trunk_start=2, trunk_end=4, hidden_size=64,
                 dtype="float32", max_sessions=4, active_sessions=1, version="1.2.0")
    return pb.InfoResponse(**{**older, **fields})


DEVICE_AND_BUDGETS = dict(device="cuda:0", dtype="bfloat16", memory_total_bytes=80 * GiB,
                          memory_base_bytes=GiB, memory_sessions_bytes=200 * MiB, max_lora_rank=64,
                          max_micro_batches=16, max_tokens_per_request=65536, max_positions=2048,
                          max_kv_tokens=1 << 20, max_saved_graphs=8)


def test_record_stores_the_device_its_memory_and_the_session_budgets():
    trunk = make_trunk("reporting", status=TrunkServer.Status.UNKNOWN)
    record(trunk, ProbeResult(info=reported_info(**DEVICE_AND_BUDGETS), latency_ms=3.0))
    trunk.refresh_from_db()
    assert trunk.status == TrunkServer.Status.UP and trunk.active_sessions == 1
    assert {name: getattr(trunk, name) for name in DEVICE_AND_BUDGETS} == DEVICE_AND_BUDGETS
    assert trunk.device_summary == "cuda:0 · bfloat16"
    assert trunk.memory_summary == "1.2 GiB of 80 GiB (base 1 GiB, sessions 200 MiB)"

    # No open session takes memory: 0 is a figure, since the trunk reports its memory.
    record(trunk, ProbeResult(info=reported_info(**{**DEVICE_AND_BUDGETS, "memory_sessions_bytes": 0})))
    trunk.refresh_from_db()
    assert trunk.memory_sessions_bytes == 0
    assert trunk.memory_summary == "1 GiB of 80 GiB (base 1 GiB, sessions 0 B)"


def test_record_stores_nothing_for_what_an_older_trunk_does_not_report():
    trunk = make_trunk("older")
    record(trunk, ProbeResult(info=reported_info(**DEVICE_AND_BUDGETS)))
    record(trunk, ProbeResult(info=reported_info()))  # e.g. the trunk was downgraded meanwhile
    trunk.refresh_from_db()
    assert trunk.status == TrunkServer.Status.UP and trunk.model_id == MODEL_ID
    assert (trunk.device, trunk.dtype) == ("", "float32")
    figures = [name for name in DEVICE_AND_BUDGETS if name not in ("device", "dtype")]
    assert {name: getattr(trunk, name) for name in figures} == dict.fromkeys(figures)
    assert trunk.device_summary == "float32" and trunk.memory_summary == ""

    record(trunk, ProbeResult(info=reported_info(dtype="")))
    assert trunk.device_summary == ""
    assert trunk.budget_problems(SessionNeeds(batch_size=64, seq_len=1 << 20, micro_batches=1 << 20,
                                              lora_rank=4096)) == {}  # nothing reported: the trunk judges


def test_record_of_a_failed_check_keeps_the_last_reported_figures():
    trunk = make_trunk("was-up")
    record(trunk, ProbeResult(info=reported_info(**DEVICE_AND_BUDGETS)))
    record(trunk, ProbeResult(error="cannot reach was-up.example:50051"))
    trunk.refresh_from_db()
    assert trunk.status == TrunkServer.Status.DOWN
    assert (trunk.device, trunk.max_lora_rank, trunk.memory_total_bytes) == ("cuda:0", 64, 80 * GiB)


@pytest.mark.parametrize("size,text", [
    (0, "0 B"), (1023, "1,023 B"), (1024, "1 KiB"), (1536, "1.5 KiB"), (512 * MiB, "512 MiB"),
    (int(1.2 * GiB), "1.2 GiB"), (80 * GiB, "80 GiB"), (2**40 - 1, "1 TiB"), (3 * 2**60, "3,072 PiB"),
])
def test_byte_sizes_read_in_binary_units(size, text):
    assert format_bytes(size) == text


def test_stopped_then_restarted_trunk_goes_down_then_up(tiny_dirs, tmp_path):
    first = start_trunk(tiny_dirs["llama"], tmp_path, token=SECRET)
    try:
        trunk = TrunkServer.objects.create(name="restarts", address=first.address, token=SECRET)
        assert check_trunk(trunk).status == TrunkServer.Status.UP
    finally:
        first.stop()

    trunk = check_trunk(TrunkServer.objects.get(pk=trunk.pk))
    trunk.refresh_from_db()
    assert trunk.status == TrunkServer.Status.DOWN and trunk.latency_ms is None
    assert trunk.last_error.startswith(f"cannot reach {first.address} (UNAVAILABLE")
    assert "is the trunk server running" in trunk.last_error and SECRET not in trunk.last_error
    assert trunk.model_id == MODEL_ID  # what it served is kept for the admin
    checked_down_at = trunk.last_checked_at

    second = start_trunk(tiny_dirs["llama"], tmp_path, token=SECRET)
    try:
        trunk.address = second.address
        trunk.save()
        trunk = check_trunk(trunk)
        trunk.refresh_from_db()
        assert trunk.status == TrunkServer.Status.UP and trunk.last_error == ""
        assert trunk.last_checked_at > checked_down_at
    finally:
        second.stop()


def test_a_wrong_token_is_reported_without_the_token(trunk_process):
    trunk = TrunkServer.objects.create(name="bad-token", address=trunk_process.address, token=SECRET)
    check_trunk(trunk)
    trunk.refresh_from_db()
    assert trunk.status == TrunkServer.Status.DOWN
    assert "refused the token (UNAUTHENTICATED)" in trunk.last_error
    assert SECRET not in trunk.last_error and trunk_process.token not in trunk.last_error


def test_nothing_listening_is_reported_as_unreachable():
    trunk = TrunkServer.objects.create(name="nowhere", address="127.0.0.1:5", token=SECRET)
    check_trunk(trunk, timeout_s=2.0)
    trunk.refresh_from_db()
    assert trunk.status == TrunkServer.Status.DOWN and trunk.last_checked_at is not None
    assert trunk.last_error.startswith("cannot reach 127.0.0.1:5 (UNAVAILABLE")


def test_a_trunk_that_is_not_serving_is_down():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        trunk = TrunkServer.objects.create(name="draining", address=f"127.0.0.1:{port}", token=SECRET)
        check_trunk(trunk)
        trunk.refresh_from_db()
        assert trunk.status == TrunkServer.Status.DOWN
        assert trunk.last_error.startswith("health service reports NOT_SERVING")

        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)  # serving, but no trunk service
        check_trunk(trunk)
        assert "does not offer the trunk service (UNIMPLEMENTED)" in trunk.last_error
    finally:
        server.stop(0)


def test_the_check_only_writes_health_fields(live_trunk):
    stale = TrunkServer.objects.get(pk=live_trunk.pk)
    TrunkServer.objects.filter(pk=live_trunk.pk).update(name="renamed meanwhile", enabled=False)
    check_trunk(stale)
    live_trunk.refresh_from_db()
    assert (live_trunk.name, live_trunk.enabled, live_trunk.status) == ("renamed meanwhile", False, "up")


# ------------------------------------------------------------------ tasks


def test_check_all_checks_enabled_trunks_and_skips_disabled_ones(live_trunk):
    unreachable = TrunkServer.objects.create(name="unreachable", address="127.0.0.1:5", token="x" * 20)
    disabled = TrunkServer.objects.create(name="disabled", address=live_trunk.address, token=live_trunk.token,
                                          enabled=False)

    assert check_all() == {"up": 1, "down": 1}

    live_trunk.refresh_from_db()
    unreachable.refresh_from_db()
    disabled.refresh_from_db()
    assert live_trunk.status == "up" and live_trunk.model_id == MODEL_ID
    assert unreachable.status == "down" and "cannot reach 127.0.0.1:5" in unreachable.last_error
    assert disabled.status == "unknown" and disabled.last_checked_at is None


def test_check_all_is_registered_under_the_beat_schedules_name(settings):
    from webapp.celery import app

    scheduled = {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}
    assert "trunks.check_all" in scheduled
    assert {"trunks.check_all", "trunks.check_one"} <= set(app.tasks)


def test_check_one_checks_by_id_and_ignores_a_deleted_trunk(live_trunk):
    assert check_one(live_trunk.pk) == "up"
    assert check_one.run(live_trunk.pk + 1000) is None
    json.dumps(check_all())  # results are JSON


# ------------------------------------------------------------------ selection


def test_pick_trunk_prefers_free_sessions_then_latency_then_name():
    make_trunk("busy", active=3, latency=1.0)
    make_trunk("slow", active=1, latency=50.0)
    make_trunk("fast", active=1, latency=5.0)
    make_trunk("other-model", model_id="gpt2", active=0)
    make_trunk("down", status=TrunkServer.Status.DOWN, active=0)
    make_trunk("disabled", enabled=False, active=0)
    assert pick_trunk(MODEL_ID).name == "fast"
    assert {t.name for t in healthy_trunks(MODEL_ID)} == {"busy", "slow", "fast"}

    make_trunk("also-fast", active=1, latency=5.0)
    assert pick_trunk(MODEL_ID).name == "also-fast"  # a full tie goes to the name


def test_pick_trunk_skips_trunks_whose_budgets_are_below_the_jobs_needs():
    make_trunk("small-cap", active=0, max_lora_rank=8)
    make_trunk("large-cap", active=2, max_lora_rank=64)
    assert pick_trunk(MODEL_ID).name == "small-cap"
    assert pick_trunk(MODEL_ID, needs=SessionNeeds(lora_rank=8)).name == "small-cap"
    assert pick_trunk(MODEL_ID, needs=SessionNeeds(lora_rank=16)).name == "large-cap"

    with pytest.raises(NoTrunkAvailable) as refused:
        pick_trunk(MODEL_ID, needs=SessionNeeds(lora_rank=128))
    assert str(refused.value) == (
        "no healthy trunk for 'llama' takes these settings (large-cap would refuse a trunk LoRA of rank 128; it "
        "allows rank 64; small-cap would refuse a trunk LoRA of rank 128; it allows rank 8); change them, or ask an "
        "administrator for a trunk with larger budgets")

    make_trunk("no-cap-reported", active=3)  # an older trunk: it judges the rank itself when the job opens
    assert pick_trunk(MODEL_ID, needs=SessionNeeds(lora_rank=128)).name == "no-cap-reported"


def test_pick_trunk_explains_what_to_do_when_none_is_available():
    with pytest.raises(NoTrunkAvailable, match="no trunk server is registered: add one in the admin"):
        pick_trunk(MODEL_ID)

    make_trunk("sleeping", status=TrunkServer.Status.DOWN)
    with pytest.raises(NoTrunkAvailable, match="sleeping served it but is down, disabled or draining; start the trunk"):
        pick_trunk(MODEL_ID)

    make_trunk("gpt2-box", model_id="gpt2")
    with pytest.raises(NoTrunkAvailable, match=r"no trunk serves 'mistral' \(the healthy trunks serve gpt2\)"):
        pick_trunk("mistral")


def test_served_models_need_a_healthy_trunk_and_the_local_model(settings, tmp_path):
    settings.MODELS_DIR = tmp_path
    for model_id in ("llama", "gpt2", "not-served"):
        (tmp_path / model_id).mkdir()
        (tmp_path / model_id / "config.json").write_text("{}")
    (tmp_path / "no-config").mkdir()

    make_trunk("a", model_id="llama", active=1)
    make_trunk("b", model_id="llama", active=2)
    make_trunk("c", model_id="gpt2", status=TrunkServer.Status.DOWN)
    make_trunk("d", model_id="no-config")
    make_trunk("e", model_id="not-local")
    make_trunk("f", model_id="..")
    assert served_models() == ["llama"]

    TrunkServer.objects.filter(name="c").update(status=TrunkServer.Status.UP)
    assert served_models() == ["gpt2", "llama"]


# ------------------------------------------------------------------ admin


def admin_page(client, name: str, *args) -> str:
    response = client.get(reverse(f"admin:trunks_trunkserver_{name}", args=args))
    assert response.status_code == 200
    return response.content.decode()


def test_admin_pages_never_show_the_token(admin_client):
    trunk = make_trunk("shown", status=TrunkServer.Status.DOWN)
    trunk.token = SECRET
    trunk.last_error = "cannot reach shown.example:50051 (UNAVAILABLE: refused)"
    trunk.save()
    # A change through the admin, so the history has an entry.
    response = admin_client.post(reverse("admin:trunks_trunkserver_change", args=[trunk.pk]), {
        "name": "shown", "address": "shown.example:50052", "token": "", "tls_ca_certificate": "", "enabled": "on",
    })
    assert response.status_code == 302

    pages = [admin_page(admin_client, "changelist"), admin_page(admin_client, "change", trunk.pk),
             admin_page(admin_client, "history", trunk.pk), admin_page(admin_client, "add")]
    for html in pages:
        assert SECRET not in html
    changelist = pages[0]
    assert "shown.example:50052" in changelist and ">down</span>" in changelist  # checked on save
    assert "leave this blank to keep the current token" in pages[1]
    assert "Changed token" not in pages[2]


def test_admin_shows_the_device_memory_and_budgets_or_that_they_were_not_reported(admin_client):
    reporting = make_trunk("reporting")
    record(reporting, ProbeResult(info=reported_info(**DEVICE_AND_BUDGETS), latency_ms=3.0))
    older = make_trunk("older")
    record(older, ProbeResult(info=reported_info()))
    make_trunk("never-checked", status=TrunkServer.Status.UNKNOWN)

    page = admin_page(admin_client, "change", reporting.pk)
    assert "cuda:0 · bfloat16" in page and "1.2 GiB of 80 GiB (base 1 GiB, sessions 200 MiB)" in page
    assert "Per-session budgets" in page
    for label, value in (("Max lora rank", "64"), ("Max positions", "2048"), ("Max kv tokens", "1048576")):
        assert re.search(rf"{label}:</label>\s*<div class=\"readonly\">{value}</div>", page), label
    older_page = admin_page(admin_client, "change", older.pk)
    for label, value in (("Device", "float32"), ("Memory", "not reported"), ("Max lora rank", "-")):
        assert re.search(rf"{label}:</label>\s*<div class=\"readonly\">{value}</div>", older_page), label


def test_admin_add_requires_a_token(admin_client):
    data = {"name": "new", "address": "127.0.0.1:50051", "token": "", "tls_ca_certificate": "", "enabled": "on"}
    response = admin_client.post(reverse("admin:trunks_trunkserver_add"), data)
    assert response.status_code == 200 and "Enter the trunk server&#x27;s token" in response.content.decode()
    assert not TrunkServer.objects.exists()

    response = admin_client.post(reverse("admin:trunks_trunkserver_add"), {**data, "token": SECRET})
    assert response.status_code == 302
    assert TrunkServer.objects.get(name="new").token == SECRET


def test_admin_edit_keeps_or_replaces_the_token(admin_client):
    trunk = make_trunk("edited")
    url = reverse("admin:trunks_trunkserver_change", args=[trunk.pk])
    data = {"name": "edited", "address": trunk.address, "tls_ca_certificate": "", "enabled": "on"}

    assert admin_client.post(url, {**data, "name": "edited-2", "token": ""}).status_code == 302
    trunk.refresh_from_db()
    assert (trunk.name, trunk.token, trunk.status) == ("edited-2", "token-of-edited", "up")

    response = admin_client.post(url, {**data, "token": SECRET}, follow=True)
    trunk.refresh_from_db()
    assert trunk.token == SECRET
    # New connection settings: the old check no longer counts; the save checks them (nothing listens there).
    assert trunk.status == "down" and trunk.last_checked_at is not None
    assert "Checked on save. Trunk edited: down: cannot reach edited.example:50051" in response.content.decode()


def test_admin_add_checks_the_trunk_and_says_what_it_found(admin_client, trunk_process):
    data = {"name": "added", "address": trunk_process.address, "token": trunk_process.token,
            "tls_ca_certificate": "", "enabled": "on"}
    response = admin_client.post(reverse("admin:trunks_trunkserver_add"), data, follow=True)
    html = response.content.decode()
    trunk = TrunkServer.objects.get(name="added")
    assert trunk.status == "up" and trunk.model_id == MODEL_ID and trunk.samples.count() == 1
    assert f"Checked on save. Trunk added: up, {trunk.latency_ms:.1f} ms, model {MODEL_ID}, layers 2-3 of 6" in html
    assert trunk_process.token not in html

    wrong = {**data, "name": "wrong-token", "token": "not-the-trunk-token-0000"}
    html = admin_client.post(reverse("admin:trunks_trunkserver_add"), wrong, follow=True).content.decode()
    assert TrunkServer.objects.get(name="wrong-token").status == "down"
    assert "Checked on save. Trunk wrong-token: down: " in html and "token" in html.split("Checked on save")[1]


def test_admin_list_fits_a_laptop_screen_and_says_disabled_or_draining(admin_client):
    checked = datetime(2026, 12, 5, 23, 42, tzinfo=UTC)
    TrunkServer.objects.filter(pk=make_trunk("plain").pk).update(last_checked_at=checked)
    make_trunk("off", enabled=False)
    TrunkServer.objects.filter(pk=make_trunk("emptying").pk).update(draining=True)
    changelist = admin_page(admin_client, "changelist")
    columns = re.findall(r'<th scope="col"[^>]*class="[^"]*column-(\w+)', changelist)
    assert columns == ["name_and_address", "status_badge", "model_id", "sessions", "latency", "last_check",
                       "short_error"]
    for name, status in (("plain", "up"), ("off", "disabled"), ("emptying", "draining")):
        row = re.search(rf'<tr>.*?>{name}<br>.*?</tr>', changelist, re.S).group(0)
        assert f">{status}</span>" in row, name
    page = admin_page(admin_client, "change", TrunkServer.objects.get(name="plain").pk)
    assert "Use TLS" in page and "TLS CA certificate" in page and "Use tls" not in page
    # Dates in the site's format (templates/_time.html), not Django's "Dec. 5, 2026, 11:42 p.m.".
    assert ('<td class="field-last_check"><time datetime="2026-12-05T23:42:00+00:00">2026-12-05 23:42:00</time>'
            in changelist)
    assert re.search(r'<time datetime="[^"]+">\d{4}-\d\d-\d\d \d\d:\d\d:\d\d</time>', page)
    for html in (changelist, page):
        assert f'<a href="{reverse("trunks:fleet")}">Fleet console (live)</a>' in html


def test_admin_check_now_action_updates_the_status(admin_client, live_trunk):
    broken = TrunkServer.objects.create(name="broken", address="127.0.0.1:5", token=SECRET)
    response = admin_client.post(reverse("admin:trunks_trunkserver_changelist"), {
        "action": "check_now", "_selected_action": [live_trunk.pk, broken.pk],
    }, follow=True)
    html = response.content.decode()
    assert response.status_code == 200
    live_trunk.refresh_from_db()
    broken.refresh_from_db()
    assert live_trunk.status == "up" and broken.status == "down"
    assert "Trunk live: up" in html and f"model {MODEL_ID}, layers 2-3 of 6, cpu · float32, sessions 0/4" in html
    assert "Trunk broken: down: cannot reach 127.0.0.1:5" in html
    assert SECRET not in html and live_trunk.token not in html


def test_admin_enable_and_disable_actions(admin_client):
    trunk = make_trunk("toggled")
    url = reverse("admin:trunks_trunkserver_changelist")
    admin_client.post(url, {"action": "disable", "_selected_action": [trunk.pk]})
    trunk.refresh_from_db()
    assert not trunk.enabled
    admin_client.post(url, {"action": "enable", "_selected_action": [trunk.pk]})
    trunk.refresh_from_db()
    assert trunk.enabled


# ------------------------------------------------------------------ API


def listed_trunk_with_secrets() -> TrunkServer:
    trunk = make_trunk("listed", active=1)
    trunk.token = SECRET
    trunk.tls_ca_certificate = "-----BEGIN CERTIFICATE-----\nMIIBca\n-----END CERTIFICATE-----"
    trunk.last_error = "connect to listed.example:50051 failed"
    trunk.save()
    return trunk


def test_api_lists_trunks_without_tokens_addresses_or_errors(client, django_user_model):
    listed_trunk_with_secrets()
    client.force_login(django_user_model.objects.create_user("someone", password="pw-123456789"))

    response = client.get(reverse("api-trunk-list"))
    assert response.status_code == 200
    assert SECRET.encode() not in response.content and b"CERTIFICATE" not in response.content
    assert b"listed.example" not in response.content, "a user does not learn where the trunk listens"
    [row] = response.json()["results"]
    assert set(row) == {"id", "name", "enabled", "draining", "status", "latency_ms", "model_id", "layer_range",
                        "max_sessions", "active_sessions", "free_sessions", "last_checked_at"}
    assert row["name"] == "listed" and row["status"] == "up" and row["model_id"] == MODEL_ID and not row["draining"]
    assert (row["max_sessions"], row["active_sessions"], row["free_sessions"]) == (4, 1, 3)


def test_api_shows_staff_the_address_and_last_error_but_never_the_token(client, django_user_model):
    listed_trunk_with_secrets()
    client.force_login(django_user_model.objects.create_user("operator", password="pw-123456789", is_staff=True))

    response = client.get(reverse("api-trunk-list"))
    assert response.status_code == 200
    assert SECRET.encode() not in response.content and b"CERTIFICATE" not in response.content
    [row] = response.json()["results"]
    assert "token" not in row and "tls_ca_certificate" not in row
    assert row["address"] == "listed.example:50051"
    assert row["last_error"] == "connect to listed.example:50051 failed"
    assert (row["max_sessions"], row["active_sessions"], row["free_sessions"]) == (4, 1, 3)


def test_api_needs_a_signed_in_user(client):
    make_trunk("hidden")
    for name in ("api-trunk-list", "api-model-list"):
        response = client.get(reverse(name))
        assert response.status_code in (401, 403)
        assert b"hidden" not in response.content


def test_api_models_lists_trainable_base_models(client, django_user_model, settings, tmp_path):
    settings.MODELS_DIR = tmp_path
    for model_id in ("llama", "gpt2"):
        (tmp_path / model_id).mkdir()
        (tmp_path / model_id / "config.json").write_text("{}")
    make_trunk("a", model_id="llama", active=1)
    make_trunk("b", model_id="llama", active=0, max_sessions=2)
    make_trunk("c", model_id="gpt2", status=TrunkServer.Status.DOWN)
    make_trunk("d", model_id="qwen")
    client.force_login(django_user_model.objects.create_user("someone", password="pw-123456789"))

    response = client.get(reverse("api-model-list"))
    assert response.status_code == 200
    assert response.json() == [{"id": "llama", "trunks": 2, "free_sessions": 5}]
