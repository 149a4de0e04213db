"""Isolation and input safety over every URL of the web app.

- Access: every URL pattern (walked from the resolver) and every WebSocket route has rows
  in a table saying what the owner of the objects, a second user and an anonymous client
  get (and, for the admin, a staff user). A URL without a row, or a row without a URL,
  fails ``test_the_table_lists_every_url``. Another user's requests change nothing of the
  owner's, and their lists never show the owner's objects.
- CSRF: every form POST and every session-authenticated API write is refused without a
  token and changes nothing; with the token it works; API tokens need no CSRF token.
- XSS: script payloads in a dataset's name, file name and contents, a job's log and error
  and a generation's prompt and output come out escaped in every page (json_script too),
  and unchanged in JSON and WebSocket output.
- File names: hostile upload names never put a file outside MEDIA_ROOT, are shown escaped,
  and the adapter download's file name never comes from the user.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator
from django.apps import apps
from django.conf import settings as django_settings
from django.contrib.auth.models import Group
from django.contrib.contenttypes.models import ContentType
from django.contrib.sessions.models import Session
from django.core.exceptions import ValidationError
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils.html import escape
from rest_framework.authtoken.models import Token
from web_fixtures import TINY_MODEL_ID

from webapp.datasets import services as dataset_services
from webapp.datasets.demo import DEMO_NAME
from webapp.datasets.models import Dataset
from webapp.playground.models import Generation
from webapp.routing import websocket_urlpatterns
from webapp.training import events
from webapp.training.models import Job, JobLog, MetricPoint
from webapp.trunks.models import TrunkServer

pytestmark = pytest.mark.django_db

OWNER_MARK = "owner-secret"  # in the name, prompt or output of every object of the owner
OTHER_MARK = "other-visible"  # the same for the second user's own objects
ROWS = b"".join(json.dumps({"prompt": f"question {i}?", "completion": f" answer {i}"}).encode() + b"\n"
                for i in range(4))


class RawUpload:
    """An upload as a client sent it: Django's UploadedFile would already cut the name to its last part."""

    def __init__(self, name: str, data: bytes) -> None:
        self.name, self.data, self.size = name, data, len(data)

    def chunks(self):
        yield self.data


# ---------------------------------------------------------------- the objects every test starts from


@dataclass
class World:
    owner: object
    other: object
    staff: object
    ids: dict[str, int] = field(default_factory=dict)  # fills the {placeholders} of the URL templates

    def url(self, template: str) -> str:
        return template.format(**self.ids)


def add_adapter(job: Job) -> None:
    """The files a succeeded job leaves; the download only packs them."""
    job.adapter_dir.mkdir(parents=True, exist_ok=True)
    (job.adapter_dir / "adapter_config.json").write_text("{}")
    (job.adapter_dir / "adapter_model.safetensors").write_bytes(b"\0" * 16)


def make_objects(user, mark: str) -> dict[str, object]:
    dataset = dataset_services.create_dataset(user, RawUpload(f"{mark}-file.jsonl", ROWS), f"{mark}-dataset")
    job = Job.objects.create(owner=user, dataset=dataset, dataset_name=dataset.name, base_model=TINY_MODEL_ID,
                             max_steps=2, status=Job.Status.SUCCEEDED, current_step=2, total_steps=2,
                             last_loss=1.5)
    add_adapter(job)
    point = MetricPoint.objects.create(job=job, step=1, kind="train", loss=2.0, lr=1e-3)
    MetricPoint.objects.create(job=job, step=2, kind="train", loss=1.5, lr=1e-3)
    JobLog.objects.create(job=job, message=f"{mark}-log")
    # Without the dataset: a queued job's dataset cannot be deleted (test_web_deletion.py), and these probes
    # delete it.
    queued = Job.objects.create(owner=user, dataset=None, dataset_name=f"{mark}-queued", base_model=TINY_MODEL_ID,
                                max_steps=2, status=Job.Status.QUEUED)
    cancelled = Job.objects.create(owner=user, dataset=dataset, dataset_name=f"{mark}-cancelled",
                                   base_model=TINY_MODEL_ID, max_steps=2, status=Job.Status.CANCELLED)
    generation = Generation.objects.create(owner=user, job=job, base_model=TINY_MODEL_ID, prompt=f"{mark}-prompt",
                                           status=Generation.Status.SUCCEEDED, output=f"{mark}-output",
                                           token_count=3)
    return {"dataset": dataset, "job": job, "queued_job": queued, "cancelled_job": cancelled,
            "generation": generation, "metricpoint": point}


@pytest.fixture(autouse=True)
def fast_passwords(settings):
    # Users are created for every test; the default hasher would make that the slowest part.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def media(settings, tmp_path, web_dirs) -> Path:
    """A fresh MEDIA_ROOT and JOBS_DIR two levels down, so that an escaping path would land in tmp_path."""
    settings.MEDIA_ROOT = str(tmp_path / "root" / "media")
    settings.JOBS_DIR = tmp_path / "root" / "jobs"
    settings.MAX_ACTIVE_JOBS_PER_USER = 0
    settings.MAX_DATASETS_PER_USER = 0
    Path(settings.MEDIA_ROOT).mkdir(parents=True)
    return Path(settings.MEDIA_ROOT)


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_superuser("staff", password="staff-pass-123")


@pytest.fixture
def world(media, owner, other, staff, redis_server) -> World:
    # A healthy trunk for the installed tiny model, so that job and playground forms can be valid.
    trunk = TrunkServer.objects.create(name="trunk-a", address="127.0.0.1:9", token="t" * 24,
                                       status=TrunkServer.Status.UP, model_id=TINY_MODEL_ID, max_sessions=4,
                                       active_sessions=0)
    mine = make_objects(owner, OWNER_MARK)
    make_objects(other, OTHER_MARK)
    Token.objects.create(user=owner)
    world = World(owner=owner, other=other, staff=staff)
    world.ids = {name: obj.pk for name, obj in mine.items()}
    world.ids.update(owner_id=owner.pk, trunk=trunk.pk, group=Group.objects.create(name="reviewers").pk,
                     dataset_ct=ContentType.objects.get_for_model(Dataset).pk)
    return world


def client_for(user) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def owner_state(world: World) -> dict:
    """Everything of the owner's that nobody else may change."""
    owner = world.owner
    files = Path(django_settings.MEDIA_ROOT) / "datasets" / str(owner.pk)
    return {
        "datasets": list(Dataset.objects.filter(owner=owner).order_by("pk").values()),
        "jobs": list(Job.objects.filter(owner=owner).order_by("pk").values()),
        "generations": list(Generation.objects.filter(owner=owner).order_by("pk").values()),
        "points": list(MetricPoint.objects.filter(job__owner=owner).order_by("pk").values()),
        "logs": list(JobLog.objects.filter(job__owner=owner).order_by("pk").values()),
        "tokens": list(Token.objects.filter(user=owner).values()),
        "files": sorted(str(path) for path in files.rglob("*")),
    }


def row_counts() -> dict[str, int]:
    """Rows per table (sessions aside: logging in and out is not a change of data)."""
    return {model._meta.label: model.objects.count() for model in apps.get_models() if model is not Session}


def body(response) -> bytes:
    return b"".join(response.streaming_content) if response.streaming else response.content


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class To:
    """A redirect whose Location starts with ``prefix``."""

    prefix: str


LOGIN = To("/accounts/login/?next=")
ADMIN_LOGIN = To("/admin/login/?next=")
API_REFUSED = 403  # no credentials: DRF's first authenticator (the session) has no WWW-Authenticate challenge
Expected = int | To


@dataclass(frozen=True)
class Probe:
    pattern: str  # the route as the resolver spells it (prefixes joined)
    method: str
    url: str  # a template: {dataset}, {job}, ... are the owner's objects
    owner: Expected
    other: Expected
    anonymous: Expected
    staff: Expected | None = None  # admin URLs and /metrics only
    data: Callable[[World], dict] | None = None
    json: bool = False
    lists: bool = False  # the owner sees their objects here, the other user only theirs
    other_creates: bool = False  # the other user's request legitimately creates their own object
    effect: Callable[[World], bool] | None = None  # what the owner's request did

    @property
    def id(self) -> str:
        return f"{self.method} {self.url}"


def upload_data(_world: World) -> dict:
    return {"file": SimpleUploadedFile("more.jsonl", ROWS), "name": "uploaded-again"}


def job_data(world: World) -> dict:
    return {"dataset": world.ids["dataset"], "base_model": TINY_MODEL_ID, "max_steps": 2, "batch_size": 2,
            "max_seq_length": 16, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "learning_rate": 0.01,
            "grad_accum_steps": 1, "warmup_steps": 0, "seed": 0, "val_fraction": 0.0}


def playground_data(world: World) -> dict:
    return {"job": world.ids["job"], "prompt": "hello", "max_new_tokens": 4, "temperature": 0, "seed": 0}


def job_status(key: str, status: str) -> Callable[[World], bool]:
    return lambda world: Job.objects.get(pk=world.ids[key]).status == status


def dataset_gone(world: World) -> bool:
    return not Dataset.objects.filter(pk=world.ids["dataset"]).exists()


def job_gone(key: str) -> Callable[[World], bool]:
    return lambda world: not Job.objects.filter(pk=world.ids[key]).exists()


def merged_building(world: World) -> bool:
    return Job.objects.get(pk=world.ids["job"]).merged_status == Job.MergedStatus.BUILDING


def jobs_of_owner(count: int) -> Callable[[World], bool]:
    return lambda world: Job.objects.filter(owner=world.owner).count() == count


P = Probe
# Route, method, URL, then what the owner, the other user and an anonymous client get.
PAGE_PROBES = [
    P("", "GET", "/", To("/jobs/"), To("/jobs/"), To("/jobs/")),
    P("accounts/login/", "GET", "/accounts/login/", To("/jobs/"), To("/jobs/"), 200),
    P("accounts/logout/", "GET", "/accounts/logout/", 405, 405, 405),
    P("accounts/logout/", "POST", "/accounts/logout/", To("/accounts/login/"), To("/accounts/login/"),
      To("/accounts/login/")),
    P("accounts/signup/", "GET", "/accounts/signup/", 404, 404, 404),  # off unless SIGNUP_ENABLED
    # Invitations: staff who may add users only; to everyone else the page does not exist.
    P("accounts/invite/", "GET", "/accounts/invite/", 404, 404, 404, staff=200),
    P("accounts/invite/", "POST", "/accounts/invite/", 404, 404, 404, staff=200, data=lambda w: {"username": "guest"}),
    # A link that is no invitation (a made-up token) is gone for everyone, logged in or not.
    P("accounts/invite/<uidb64>/<token>/", "GET", "/accounts/invite/MQ/not-a-token/", 410, 410, 410),
    P("datasets/", "GET", "/datasets/", 200, 200, LOGIN, lists=True),
    P("datasets/upload/", "GET", "/datasets/upload/", 405, 405, LOGIN),
    P("datasets/upload/", "POST", "/datasets/upload/", To("/datasets/"), To("/datasets/"), LOGIN,
      data=upload_data, other_creates=True),
    P("datasets/demo/", "GET", "/datasets/demo/", 405, 405, LOGIN),
    P("datasets/demo/", "POST", "/datasets/demo/", To("/datasets/"), To("/datasets/"), LOGIN, other_creates=True,
      effect=lambda w: Dataset.objects.filter(owner=w.owner, name=DEMO_NAME).count() == 1),
    P("datasets/<int:dataset_id>/", "GET", "/datasets/{dataset}/", 200, 404, LOGIN),
    P("datasets/<int:dataset_id>/delete/", "GET", "/datasets/{dataset}/delete/", 200, 404, LOGIN),
    P("datasets/<int:dataset_id>/delete/", "POST", "/datasets/{dataset}/delete/", To("/datasets/"), 404, LOGIN,
      effect=dataset_gone),
    P("jobs/", "GET", "/jobs/", 200, 200, LOGIN, lists=True),
    P("jobs/new/", "GET", "/jobs/new/?dataset={dataset}", 200, 200, LOGIN, lists=True),
    # The other user names the owner's dataset: a form error, and no job for anyone.
    P("jobs/new/", "POST", "/jobs/new/", To("/jobs/"), 200, LOGIN, data=job_data, effect=jobs_of_owner(4)),
    P("jobs/compare/", "GET", "/jobs/compare/?ids={job}&ids={queued_job}", 200, 200, LOGIN, lists=True),
    P("jobs/<int:pk>/", "GET", "/jobs/{job}/", 200, 404, LOGIN),
    P("jobs/<int:pk>/cancel/", "GET", "/jobs/{queued_job}/cancel/", 405, 405, LOGIN),
    P("jobs/<int:pk>/cancel/", "POST", "/jobs/{queued_job}/cancel/", To("/jobs/"), 404, LOGIN,
      effect=job_status("queued_job", "cancelled")),
    P("jobs/<int:pk>/resume/", "GET", "/jobs/{cancelled_job}/resume/", 405, 405, LOGIN),
    P("jobs/<int:pk>/resume/", "POST", "/jobs/{cancelled_job}/resume/", To("/jobs/"), 404, LOGIN,
      effect=job_status("cancelled_job", "queued")),
    P("jobs/<int:pk>/delete/", "GET", "/jobs/{cancelled_job}/delete/", 200, 404, LOGIN),
    P("jobs/<int:pk>/delete/", "POST", "/jobs/{cancelled_job}/delete/", To("/jobs/"), 404, LOGIN,
      effect=job_gone("cancelled_job")),
    P("jobs/<int:pk>/adapter/", "GET", "/jobs/{job}/adapter/", 200, 404, LOGIN),
    # Not built yet: 404 to its owner too (building and downloading it: test_web_merged_download.py).
    P("jobs/<int:pk>/merged/", "GET", "/jobs/{job}/merged/", 404, 404, LOGIN),
    P("jobs/<int:pk>/merged/", "POST", "/jobs/{job}/merged/", To("/jobs/"), 404, LOGIN, effect=merged_building),
    P("playground/", "GET", "/playground/?job={job}", 200, 200, LOGIN, lists=True),
    P("playground/", "GET", "/playground/?ids={generation}", 200, 404, LOGIN),
    # The other user names the owner's job: a form error, and no generation for anyone.
    P("playground/", "POST", "/playground/", To("/playground/?ids="), 200, LOGIN, data=playground_data,
      effect=lambda world: Generation.objects.filter(owner=world.owner).count() == 3),
    P("playground/generations/<int:pk>/stop/", "GET", "/playground/generations/{generation}/stop/", 405, 405, LOGIN),
    # The owner's generation has ended: a message, and nothing changes (stopping: test_web_playground.py).
    P("playground/generations/<int:pk>/stop/", "POST", "/playground/generations/{generation}/stop/",
      To("/playground/?ids="), 404, LOGIN),
    # The same icon for everyone: browsers ask for it before anyone logs in.
    P("favicon.ico", "GET", "/favicon.ico", To("/static/favicon.svg"), To("/static/favicon.svg"),
      To("/static/favicon.svg")),
    # Staff only (a session or an API token: test_web_metrics.py); to everyone else it does not exist.
    P("metrics", "GET", "/metrics", 404, 404, 404, staff=200),
    # The fleet console: staff only, to everyone else no such page (actions: test_web_fleet.py).
    P("fleet/", "GET", "/fleet/", 404, 404, 404, staff=200),
    P("fleet/<int:pk>/<slug:action>/", "GET", "/fleet/{trunk}/drain/", 404, 404, 404, staff=405),
    P("fleet/<int:pk>/<slug:action>/", "POST", "/fleet/{trunk}/drain/", 404, 404, 404, staff=To("/fleet/"),
      effect=lambda world: not TrunkServer.objects.get(pk=world.ids["trunk"]).draining),
]

API_PROBES = [
    P("api/datasets/", "GET", "/api/datasets/", 200, 200, API_REFUSED, lists=True),
    P("api/datasets/", "POST", "/api/datasets/", 201, 201, API_REFUSED, data=upload_data, other_creates=True),
    P("api/datasets/<int:pk>/", "GET", "/api/datasets/{dataset}/", 200, 404, API_REFUSED),
    P("api/datasets/<int:pk>/", "DELETE", "/api/datasets/{dataset}/", 204, 404, API_REFUSED, effect=dataset_gone),
    P("api/jobs/", "GET", "/api/jobs/", 200, 200, API_REFUSED, lists=True),
    P("api/jobs/", "POST", "/api/jobs/", 201, 400, API_REFUSED, data=job_data, json=True,
      effect=jobs_of_owner(4)),
    P("api/jobs/<int:pk>/", "GET", "/api/jobs/{job}/", 200, 404, API_REFUSED),
    P("api/jobs/<int:pk>/", "DELETE", "/api/jobs/{cancelled_job}/", 204, 404, API_REFUSED,
      effect=job_gone("cancelled_job")),
    P("api/jobs/<int:pk>/metrics/", "GET", "/api/jobs/{job}/metrics/", 200, 404, API_REFUSED),
    P("api/jobs/<int:pk>/cancel/", "POST", "/api/jobs/{queued_job}/cancel/", 200, 404, API_REFUSED,
      effect=job_status("queued_job", "cancelled")),
    P("api/jobs/<int:pk>/resume/", "POST", "/api/jobs/{cancelled_job}/resume/", 200, 404, API_REFUSED,
      effect=job_status("cancelled_job", "queued")),
    P("api/jobs/<int:pk>/adapter/", "GET", "/api/jobs/{job}/adapter/", 200, 404, API_REFUSED),
    P("api/jobs/<int:pk>/merged/", "GET", "/api/jobs/{job}/merged/", 409, 404, API_REFUSED),  # not built yet
    P("api/jobs/<int:pk>/merged/", "POST", "/api/jobs/{job}/merged/", 202, 404, API_REFUSED, effect=merged_building),
    P("api/trunks/", "GET", "/api/trunks/", 200, 200, API_REFUSED),  # shared: trunks have no owner
    P("api/models/", "GET", "/api/models/", 200, 200, API_REFUSED),
    P("api/storage/", "GET", "/api/storage/", 200, 200, API_REFUSED),  # each user's own figures
]


def admin(pattern: str, url: str, staff: Expected) -> Probe:
    """An admin URL: staff only; everyone else is sent to the admin's login."""
    return Probe(pattern, "GET", url, ADMIN_LOGIN, ADMIN_LOGIN, ADMIN_LOGIN, staff=staff)


# Admin path of each registered model -> (the owner's object shown, what staff get from "add").
ADMIN_MODELS = {
    "auth/group": ("{group}", 200),
    "auth/user": ("{owner_id}", 200),
    "authtoken/tokenproxy": ("{owner_id}", 200),  # a token's admin id is its user's id
    "datasets/dataset": ("{dataset}", 403),  # uploads only through the validated page and API
    "trunks/trunkserver": ("{trunk}", 200),
    "training/job": ("{job}", 200),
    "training/metricpoint": ("{metricpoint}", 200),
    "playground/generation": ("{generation}", 200),
}
ADMIN_PROBES = [
    admin("admin/", "/admin/", 200),
    Probe("admin/login/", "GET", "/admin/login/", 200, 200, 200, staff=To("/admin/")),
    # Django sends whoever may not use the admin to its index (and from there to its login).
    Probe("admin/logout/", "GET", "/admin/logout/", To("/admin/"), To("/admin/"), To("/admin/"), staff=405),
    admin("admin/password_change/", "/admin/password_change/", 200),
    admin("admin/password_change/done/", "/admin/password_change/done/", 200),
    admin("admin/autocomplete/", "/admin/autocomplete/", 403),  # without a field to complete
    admin("admin/jsi18n/", "/admin/jsi18n/", 200),
    admin("admin/r/<path:content_type_id>/<path:object_id>/", "/admin/r/{dataset_ct}/{dataset}/", 404),
    admin("admin/auth/user/<id>/password/", "/admin/auth/user/{owner_id}/password/", 200),
    admin("admin/^(?P<app_label>auth|authtoken|datasets|trunks|training|playground)/$", "/admin/datasets/", 200),
    admin("admin/(?P<url>.*)$", "/admin/no-such-page/", 404),
]
for _path, (_object, _add) in ADMIN_MODELS.items():
    ADMIN_PROBES += [
        admin(f"admin/{_path}/", f"/admin/{_path}/", 200),
        admin(f"admin/{_path}/add/", f"/admin/{_path}/add/", _add),
        admin(f"admin/{_path}/<path:object_id>/history/", f"/admin/{_path}/{_object}/history/", 200),
        admin(f"admin/{_path}/<path:object_id>/delete/", f"/admin/{_path}/{_object}/delete/", 200),
        admin(f"admin/{_path}/<path:object_id>/change/", f"/admin/{_path}/{_object}/change/", 200),
        admin(f"admin/{_path}/<path:object_id>/", f"/admin/{_path}/{_object}/", To(f"/admin/{_path}/")),
    ]

PROBES = PAGE_PROBES + API_PROBES + ADMIN_PROBES


@dataclass(frozen=True)
class SocketRow:
    url: str
    owner: bool | int  # True: accepted; else the close code
    other: bool | int
    anonymous: bool | int
    about: str | None = None  # the object (a key of World.ids) the first message of an accepted socket is about
    staff: bool | int | None = None  # staff-only sockets


ACCEPTED = True
SOCKETS = {
    "ws/jobs/": SocketRow("/ws/jobs/", ACCEPTED, ACCEPTED, 4401),  # each user's own jobs: see the test below
    "ws/jobs/<int:job_id>/": SocketRow("/ws/jobs/{job}/", ACCEPTED, 4404, 4401, about="job"),
    "ws/generations/<int:generation_id>/": SocketRow("/ws/generations/{generation}/", ACCEPTED, 4404, 4401,
                                                     about="generation"),
    # The fleet page's socket: staff only; to anyone else as if there were no such socket.
    "ws/fleet/": SocketRow("/ws/fleet/", 4404, 4404, 4401, staff=ACCEPTED),
}


def url_patterns(resolver: URLResolver | None = None, prefix: str = "") -> list[str]:
    resolver = resolver or get_resolver()
    found = []
    for entry in resolver.url_patterns:
        route = prefix + str(entry.pattern)
        if isinstance(entry, URLResolver):
            found += url_patterns(entry, route)
        else:
            assert isinstance(entry, URLPattern)
            found.append(route)
    return found


def test_the_table_lists_every_url():
    patterns = url_patterns()
    assert len(patterns) == len(set(patterns)), "two URL patterns with the same route"
    listed = {probe.pattern for probe in PROBES}
    assert sorted(set(patterns) - listed) == [], "URL patterns without a row in the table: add rows for them"
    assert sorted(listed - set(patterns)) == [], "rows for URL patterns that no longer exist"
    sockets = [str(entry.pattern) for entry in websocket_urlpatterns]
    assert sorted(set(sockets) ^ set(SOCKETS)) == [], "WebSocket routes and the table differ"
    assert len({probe.id for probe in PROBES}) == len(PROBES), "two rows for the same request"


# ---------------------------------------------------------------- access: one test per row


def send(client: Client, probe: Probe, world: World, **extra):
    url = world.url(probe.url)
    data = probe.data(world) if probe.data else None
    if probe.json:
        return client.generic(probe.method, url, json.dumps(data), content_type="application/json", **extra)
    if data is not None:
        return client.post(url, data, **extra)
    return client.generic(probe.method, url, **extra)


def assert_response(response, expected: Expected, context: str) -> None:
    location = response.get("Location", "")
    detail = f"{context}: got {response.status_code} {location} {body(response)[:300]!r}"
    if isinstance(expected, To):
        assert response.status_code == 302 and location.startswith(expected.prefix), detail
    else:
        assert response.status_code == expected, detail


@pytest.mark.parametrize("probe", PROBES, ids=[probe.id for probe in PROBES])
def test_access(probe: Probe, world: World):
    """Anonymous first, then the other user: neither changes anything; then the owner (and staff for the admin)."""
    roles = [("anonymous", None, probe.anonymous), ("other", world.other, probe.other),
             ("owner", world.owner, probe.owner)]
    if probe.staff is not None:
        roles.append(("staff", world.staff, probe.staff))
    for role, user, expected in roles:
        client = client_for(user)
        state, counts = owner_state(world), row_counts()
        response = send(client, probe, world)
        assert_response(response, expected, f"{role} {probe.method} {world.url(probe.url)}")
        content = body(response).decode("utf-8", "replace")
        if role == "anonymous":
            assert (owner_state(world), row_counts()) == (state, counts), "an anonymous request changed data"
        if role == "other":
            assert owner_state(world) == state, "another user's request changed the owner's objects"
            if not probe.other_creates:
                assert row_counts() == counts, "another user's request changed data"
            assert OWNER_MARK not in content, "the owner's objects are shown to another user"
            if probe.lists:
                assert OTHER_MARK in content, "the other user's own objects are listed"
        if role == "owner":
            if probe.lists:
                assert OWNER_MARK in content and OTHER_MARK not in content
            if probe.effect is not None:
                assert probe.effect(world), f"the owner's {probe.method} did not do its work"


API_LISTS = {"/api/datasets/": Dataset, "/api/jobs/": Job}


@pytest.mark.parametrize("url", API_LISTS)
def test_api_lists_hold_only_the_users_own_ids(url, world):
    model = API_LISTS[url]
    for user in (world.owner, world.other):
        listed = {row["id"] for row in client_for(user).get(url).json()["results"]}
        assert listed == set(model.objects.filter(owner=user).values_list("pk", flat=True)) != set()


HUGE = 10**30
# Query parameters no form checks: answered (ignored, a 404 or a message), never a 500.
ODD_QUERIES = {
    "/jobs/compare/?ids={huge}": 200,
    "/jobs/compare/?id={huge},{job}": 200,
    "/jobs/compare/?ids=%C2%B2": 200,  # "²" is a digit to str.isdigit(), not to int()
    "/jobs/new/?dataset={huge}": 200,
    "/jobs/new/?dataset=abc": 200,
    "/playground/?job={huge}": 200,
    "/playground/?job=%C2%B2": 200,
    "/playground/?ids=%C2%B2": 404,
    "/playground/?ids=,,": 200,
    "/datasets/{dataset}/?max_length={huge}": 400,
    "/api/jobs/?offset={huge}": 200,
    "/api/jobs/?limit={huge}": 200,
    "/api/trunks/?limit={huge}": 200,
    "/api/datasets/?limit={huge}&offset={huge}": 200,
    "/api/datasets/?limit=-1&offset=-5": 200,
    "/api/jobs/{job}/metrics/?after={huge}": 200,
    "/api/jobs/{job}/metrics/?after=-{huge}": 200,
    "/api/jobs/{job}/metrics/?after=x": 400,
}


@pytest.mark.parametrize("url", ODD_QUERIES)
def test_odd_query_parameters_are_answered_not_crashed(url, world):
    response = client_for(world.owner).get(url.format(huge=HUGE, **world.ids))
    assert response.status_code == ODD_QUERIES[url]


OBJECT_URLS = ["/datasets/{id}/", "/datasets/{id}/delete/", "/jobs/{id}/", "/jobs/{id}/adapter/",
               "/playground/?ids={id}", "/api/datasets/{id}/", "/api/jobs/{id}/", "/api/jobs/{id}/metrics/",
               "/api/jobs/{id}/adapter/", "/jobs/{id}/merged/", "/api/jobs/{id}/merged/"]


@pytest.mark.parametrize("url", OBJECT_URLS)
def test_unknown_and_out_of_range_ids_are_not_found(url, world):
    client = client_for(world.owner)
    for object_id in (0, 999_999, 2**63, HUGE):
        response = client.get(url.format(id=object_id))
        assert response.status_code == 404, (url, object_id, response.status_code)
    for object_id in (2**63, HUGE):
        for action in ("/jobs/{id}/cancel/", "/api/jobs/{id}/resume/"):
            assert client.post(action.format(id=object_id)).status_code == 404


# ---------------------------------------------------------------- WebSockets


def socket_headers(user) -> list[tuple[bytes, bytes]]:
    headers = [(b"origin", b"http://127.0.0.1"), (b"host", b"127.0.0.1")]
    if user is not None:
        cookie = client_for(user).cookies[django_settings.SESSION_COOKIE_NAME].value
        headers.append((b"cookie", f"{django_settings.SESSION_COOKIE_NAME}={cookie}".encode()))
    return headers


async def open_socket(path: str, user) -> tuple[WebsocketCommunicator, bool, int | None]:
    headers = await sync_to_async(socket_headers)(user)
    from webapp.asgi import application

    communicator = WebsocketCommunicator(application, path, headers=headers)
    accepted, detail = await communicator.connect(timeout=10)
    return communicator, accepted, None if accepted else detail


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("route", SOCKETS)
def test_socket_access(route, world):
    row = SOCKETS[route]
    path = world.url(row.url)

    async def scenario():
        roles = [("anonymous", None, row.anonymous), ("other", world.other, row.other),
                 ("owner", world.owner, row.owner)]
        if row.staff is not None:
            roles.append(("staff", world.staff, row.staff))
        for role, user, expected in roles:
            communicator, accepted, code = await open_socket(path, user)
            if expected is ACCEPTED:
                assert accepted, f"{role} was refused {path} with {code}"
                if row.about is not None:
                    first = await communicator.receive_json_from(timeout=10)
                    assert first[row.about] == world.ids[row.about], first
                await communicator.disconnect()
            else:
                assert (accepted, code) == (False, expected), f"{role} on {path}"

    async_to_sync(scenario)()


@pytest.mark.django_db(transaction=True)
def test_socket_ids_that_do_not_exist_are_refused(world):
    async def scenario():
        for path in ("/ws/jobs/999999/", f"/ws/jobs/{2**63}/", "/ws/generations/999999/",
                     f"/ws/generations/{10**30}/"):
            _, accepted, code = await open_socket(path, world.owner)
            assert (accepted, code) == (False, 4404), path

    async_to_sync(scenario)()


@pytest.mark.django_db(transaction=True)
def test_socket_replay_positions_out_of_range_are_answered(world):
    async def scenario():
        path = world.url(f"/ws/jobs/{{job}}/?after={HUGE}&log_after={HUGE}")
        socket, accepted, _ = await open_socket(path, world.owner)
        assert accepted
        _status, history = [await socket.receive_json_from(timeout=10) for _ in range(2)]
        assert history["metrics"] == [] and history["logs"] == []
        await socket.disconnect()

    async_to_sync(scenario)()


@pytest.mark.django_db(transaction=True)
def test_the_job_list_socket_sends_only_the_users_own_jobs(world):
    mine = Job.objects.get(pk=world.ids["queued_job"])
    theirs = Job.objects.filter(owner=world.other, status=Job.Status.QUEUED).get()

    async def scenario():
        owner_socket, owner_ok, _ = await open_socket("/ws/jobs/", world.owner)
        other_socket, other_ok, _ = await open_socket("/ws/jobs/", world.other)
        assert owner_ok and other_ok
        for job in (mine, theirs):
            await sync_to_async(events.publish_status)(job)
        assert (await owner_socket.receive_json_from(timeout=10))["job"] == mine.pk
        assert (await other_socket.receive_json_from(timeout=10))["job"] == theirs.pk
        assert await owner_socket.receive_nothing(timeout=0.5) and await other_socket.receive_nothing(timeout=0.5)
        for socket in (owner_socket, other_socket):
            await socket.disconnect()

    async_to_sync(scenario)()


# ---------------------------------------------------------------- CSRF


@dataclass(frozen=True)
class CsrfCase:
    name: str
    user: str | None  # "owner", "staff" or None (anonymous)
    form_page: str  # a page with the form, which sets the CSRF cookie
    method: str
    url: str
    data: Callable[[World], dict]
    done: Callable[[World, Client], bool]
    succeeds: Expected
    api: str = ""  # "", "multipart" or "json": an API call sends its token in the X-CSRFToken header


def logged_in(client: Client) -> bool:
    return "_auth_user_id" in client.session


CSRF_CASES = [
    CsrfCase("login", None, "/accounts/login/", "POST", "/accounts/login/",
             lambda w: {"username": "owner", "password": "owner-pass-123"}, lambda w, c: logged_in(c), To("/jobs/")),
    CsrfCase("signup", None, "/accounts/signup/", "POST", "/accounts/signup/",
             lambda w: {"username": "newcomer", "password1": "x-Very-long-pass-9", "password2": "x-Very-long-pass-9"},
             lambda w, c: w.owner.__class__.objects.filter(username="newcomer").exists(), To("/jobs/")),
    CsrfCase("logout", "owner", "/jobs/", "POST", "/accounts/logout/", lambda w: {},
             lambda w, c: not logged_in(c), To("/accounts/login/")),
    CsrfCase("dataset upload", "owner", "/datasets/", "POST", "/datasets/upload/", upload_data,
             lambda w, c: Dataset.objects.filter(owner=w.owner).count() == 2, To("/datasets/")),
    CsrfCase("demo dataset", "owner", "/datasets/", "POST", "/datasets/demo/", lambda w: {},
             lambda w, c: Dataset.objects.filter(owner=w.owner, name=DEMO_NAME).exists(), To("/datasets/")),
    CsrfCase("invite", "staff", "/accounts/invite/", "POST", "/accounts/invite/", lambda w: {"username": "guest"},
             lambda w, c: w.owner.__class__.objects.filter(username="guest").exists(), 200),
    CsrfCase("dataset delete", "owner", "/datasets/{dataset}/delete/", "POST", "/datasets/{dataset}/delete/",
             lambda w: {}, lambda w, c: dataset_gone(w), To("/datasets/")),
    CsrfCase("job create", "owner", "/jobs/new/", "POST", "/jobs/new/", job_data,
             lambda w, c: jobs_of_owner(4)(w), To("/jobs/")),
    CsrfCase("job cancel", "owner", "/jobs/{queued_job}/", "POST", "/jobs/{queued_job}/cancel/", lambda w: {},
             lambda w, c: job_status("queued_job", "cancelled")(w), To("/jobs/")),
    CsrfCase("job resume", "owner", "/jobs/{cancelled_job}/", "POST", "/jobs/{cancelled_job}/resume/",
             lambda w: {}, lambda w, c: job_status("cancelled_job", "queued")(w), To("/jobs/")),
    CsrfCase("merged model", "owner", "/jobs/{job}/", "POST", "/jobs/{job}/merged/", lambda w: {},
             lambda w, c: merged_building(w), To("/jobs/")),
    CsrfCase("playground", "owner", "/playground/", "POST", "/playground/", playground_data,
             lambda w, c: Generation.objects.filter(owner=w.owner).count() == 3, To("/playground/?ids=")),
    CsrfCase("admin delete", "staff", "/admin/datasets/dataset/{dataset}/delete/", "POST",
             "/admin/datasets/dataset/{dataset}/delete/", lambda w: {"post": "yes"},
             lambda w, c: dataset_gone(w), To("/admin/datasets/dataset/")),
    CsrfCase("API upload", "owner", "/datasets/", "POST", "/api/datasets/", upload_data,
             lambda w, c: Dataset.objects.filter(owner=w.owner).count() == 2, 201, api="multipart"),
    CsrfCase("API delete", "owner", "/datasets/", "DELETE", "/api/datasets/{dataset}/", lambda w: {},
             lambda w, c: dataset_gone(w), 204, api="json"),
    CsrfCase("API job create", "owner", "/datasets/", "POST", "/api/jobs/", job_data,
             lambda w, c: jobs_of_owner(4)(w), 201, api="json"),
    CsrfCase("API cancel", "owner", "/datasets/", "POST", "/api/jobs/{queued_job}/cancel/", lambda w: {},
             lambda w, c: job_status("queued_job", "cancelled")(w), 200, api="json"),
    CsrfCase("API resume", "owner", "/datasets/", "POST", "/api/jobs/{cancelled_job}/resume/", lambda w: {},
             lambda w, c: job_status("cancelled_job", "queued")(w), 200, api="json"),
    CsrfCase("API merged model", "owner", "/datasets/", "POST", "/api/jobs/{job}/merged/", lambda w: {},
             lambda w, c: merged_building(w), 202, api="json"),
]


def csrf_send(client: Client, case: CsrfCase, world: World, token: str | None):
    url, data = world.url(case.url), case.data(world)
    if case.api == "json":
        extra = {"HTTP_X_CSRFTOKEN": token} if token else {}
        return client.generic(case.method, url, json.dumps(data), content_type="application/json", **extra)
    if case.api == "multipart":
        extra = {"HTTP_X_CSRFTOKEN": token} if token else {}
        return client.post(url, data, **extra)
    if token:
        data["csrfmiddlewaretoken"] = token
    return client.post(url, data)


@pytest.mark.parametrize("case", CSRF_CASES, ids=[case.name for case in CSRF_CASES])
def test_csrf(case: CsrfCase, world: World, settings):
    settings.SIGNUP_ENABLED = True
    client = Client(enforce_csrf_checks=True)
    if case.user is not None:
        client.force_login(getattr(world, case.user))
    page = client.get(world.url(case.form_page))
    assert page.status_code == 200, page.status_code
    token = client.cookies[settings.CSRF_COOKIE_NAME].value  # what a page from another site cannot read

    state, counts = owner_state(world), row_counts()
    refused = csrf_send(client, case, world, token=None)
    assert refused.status_code == 403 and b"CSRF" in body(refused), (refused.status_code, body(refused)[:300])
    assert not case.done(world, client)
    assert (owner_state(world), row_counts()) == (state, counts), "a request without a CSRF token changed data"

    accepted = csrf_send(client, case, world, token=token)
    assert_response(accepted, case.succeeds, f"{case.name} with the token")
    assert case.done(world, client)


def test_api_tokens_need_no_csrf_token_and_do_not_cross_users(world):
    owner_key = Token.objects.get(user=world.owner).key
    other_key = Token.objects.create(user=world.other).key
    strict = Client(enforce_csrf_checks=True)
    cancel = world.url("/api/jobs/{queued_job}/cancel/")
    assert strict.post(cancel, HTTP_AUTHORIZATION=f"Token {other_key}").status_code == 404
    assert strict.delete(world.url("/api/datasets/{dataset}/"),
                         HTTP_AUTHORIZATION=f"Token {other_key}").status_code == 404
    assert job_status("queued_job", "queued")(world) and not dataset_gone(world)
    assert strict.post(cancel, HTTP_AUTHORIZATION=f"Token {owner_key}").status_code == 200
    assert job_status("queued_job", "cancelled")(world)
    response = strict.post("/api/datasets/", upload_data(world), HTTP_AUTHORIZATION=f"Token {owner_key}")
    assert response.status_code == 201, response.content
    assert strict.post(cancel, HTTP_AUTHORIZATION="Token not-a-token").status_code == API_REFUSED


# ---------------------------------------------------------------- XSS


SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'
TEXTAREA = "</textarea><script>alert(3)</script>"
# None of these may ever appear as they are in HTML.
RAW = ["<script>alert(", "<img src=x", "</textarea><script>"]

XSS_NAME = f"{SCRIPT} {IMG}"
XSS_FILENAME = f"{IMG}.jsonl"  # no slash: a file name keeps only its last part
XSS_ROWS = (json.dumps({"prompt": f"{TEXTAREA} {IMG}", "completion": f" {SCRIPT}"}) + "\n").encode()


@pytest.fixture
def hostile(world) -> dict[str, object]:
    """Objects of the owner whose every user-controlled text is a payload."""
    dataset = dataset_services.create_dataset(world.owner, RawUpload(XSS_FILENAME, XSS_ROWS), XSS_NAME)
    job = Job.objects.create(owner=world.owner, dataset=dataset, dataset_name=dataset.name, base_model=TINY_MODEL_ID,
                             max_steps=2, status=Job.Status.SUCCEEDED, current_step=2, total_steps=2)
    add_adapter(job)
    MetricPoint.objects.create(job=job, step=1, kind="train", loss=2.0)
    JobLog.objects.create(job=job, message=TEXTAREA)
    failed = Job.objects.create(owner=world.owner, dataset=dataset, dataset_name=dataset.name,
                                base_model=TINY_MODEL_ID, status=Job.Status.FAILED, error_message=IMG)
    generation = Generation.objects.create(owner=world.owner, job=job, base_model=TINY_MODEL_ID,
                                           prompt=f"{TEXTAREA} {SCRIPT}", status=Generation.Status.SUCCEEDED,
                                           output=IMG, error_message="")
    # On the fleet page (staff): a running job of the owner's and the trunk's last error.
    Job.objects.create(owner=world.owner, dataset=dataset, dataset_name=dataset.name, base_model=TINY_MODEL_ID,
                       status=Job.Status.RUNNING, trunk_id=world.ids["trunk"])
    TrunkServer.objects.filter(pk=world.ids["trunk"]).update(last_error=IMG)
    return {"dataset": dataset, "job": job, "failed": failed, "generation": generation}


def xss_pages(objects) -> dict[str, tuple[str, list[str]]]:
    """Page -> (who sees it, the texts it must show escaped)."""
    d, j, f, g = (objects[key].pk for key in ("dataset", "job", "failed", "generation"))
    return {
        "/datasets/": ("owner", [XSS_NAME, XSS_FILENAME]),
        f"/datasets/{d}/": ("owner", [XSS_NAME, XSS_FILENAME, TEXTAREA, SCRIPT]),  # the preview shows the rows
        f"/datasets/{d}/delete/": ("owner", [XSS_NAME, XSS_FILENAME]),
        f"/datasets/{d}/?model={urllib.parse.quote(SCRIPT)}&max_length={urllib.parse.quote(IMG)}": ("owner", []),
        "/jobs/": ("owner", [XSS_NAME]),
        f"/jobs/{j}/": ("owner", [XSS_NAME, TEXTAREA]),
        f"/jobs/{f}/": ("owner", [XSS_NAME, IMG]),
        f"/jobs/compare/?ids={j}&ids={f}": ("owner", [XSS_NAME]),
        "/jobs/new/": ("owner", [XSS_NAME]),
        "/playground/": ("owner", [XSS_NAME]),
        f"/playground/?ids={g}": ("owner", [f"{TEXTAREA} {SCRIPT}", IMG]),  # the prompt: above and in the form
        "/fleet/": ("staff", [XSS_NAME, IMG]),
        f"/accounts/login/?next={urllib.parse.quote(IMG)}": (None, []),
        "/admin/datasets/dataset/": ("staff", [XSS_NAME]),
        f"/admin/datasets/dataset/{d}/change/": ("staff", [XSS_NAME, XSS_FILENAME]),
        "/admin/training/job/": ("staff", [XSS_NAME]),
        f"/admin/training/job/{f}/change/": ("staff", [XSS_NAME, IMG]),
        f"/admin/playground/generation/{g}/change/": ("staff", [f"{TEXTAREA} {SCRIPT}", IMG]),
        "/api/datasets/": ("owner", []),  # the browsable API (asked for text/html)
        f"/api/jobs/{f}/": ("owner", []),
    }


def test_payloads_are_escaped_in_every_page(world, hostile):
    clients = {"owner": client_for(world.owner), "staff": client_for(world.staff), None: client_for(None)}
    for url, (who, shown) in xss_pages(hostile).items():
        response = clients[who].get(url, HTTP_ACCEPT="text/html")
        html = response.content.decode()
        assert response.status_code in (200, 400) and response["Content-Type"].startswith("text/html"), url
        for raw in RAW:
            assert raw not in html, f"{url} shows {raw!r} unescaped"
        for text in shown:
            assert escape(text) in html, f"{url} does not show {text!r} (escaped)"


def test_json_embedded_in_a_page_cannot_end_its_script(world, hostile):
    job, failed = hostile["job"].pk, hostile["failed"].pk
    html = client_for(world.owner).get(f"/jobs/compare/?ids={job}&ids={failed}").content.decode()
    embedded = re.search(r'<script id="compare-series" type="application/json">(.*?)</script>', html, re.S).group(1)
    assert "<" not in embedded and ">" not in embedded, "json_script escapes angle brackets"
    # The failed job recorded no loss: the page leaves it out of the chart (and names it in a note).
    assert [(series["id"], series["name"]) for series in json.loads(embedded)] == [(job, XSS_NAME)]
    assert f'{escape(XSS_NAME)} <small>#{failed}</small>' in html


def test_json_output_keeps_the_text_and_is_never_html(world, hostile):
    client = client_for(world.owner)
    expected = {f"/api/datasets/{hostile['dataset'].pk}/": {"name": XSS_NAME, "original_filename": XSS_FILENAME},
                f"/api/jobs/{hostile['failed'].pk}/": {"dataset_name": XSS_NAME, "error_message": IMG}}
    for url, fields in expected.items():
        response = client.get(url)
        assert response["Content-Type"] == "application/json"
        assert response["X-Content-Type-Options"] == "nosniff", "browsers must not sniff JSON as HTML"
        assert {name: response.json()[name] for name in fields} == fields


@pytest.mark.django_db(transaction=True)
def test_socket_output_keeps_the_text(world, hostile):
    job, generation = hostile["job"].pk, hostile["generation"].pk

    async def scenario():
        socket, accepted, _ = await open_socket(f"/ws/jobs/{job}/", world.owner)
        assert accepted
        _status, history = [await socket.receive_json_from(timeout=10) for _ in range(2)]
        assert [entry["message"] for entry in history["logs"]] == [TEXTAREA]
        await socket.disconnect()
        socket, accepted, _ = await open_socket(f"/ws/generations/{generation}/", world.owner)
        assert accepted and (await socket.receive_json_from(timeout=10))["text"] == IMG
        await socket.disconnect()

    async_to_sync(scenario)()


def test_scripts_put_socket_text_in_as_text():
    """The pages' scripts insert what sockets send with textContent, never as HTML."""
    static = Path(__file__).resolve().parent.parent / "static" / "js"
    for script in static.glob("*.js"):
        source = script.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in source, f"{script.name} uses {sink}"


# ---------------------------------------------------------------- file names

HOSTILE_NAMES = {
    # id: (name sent, the original name kept; None: refused with a message)
    "dot-dot slash": ("../../etc/passwd.jsonl", "passwd.jsonl"),
    "dot-dot backslash": ("..\\..\\x.jsonl", "x.jsonl"),
    "absolute": ("/etc/passwd.jsonl", "passwd.jsonl"),
    "absolute windows": ("C:\\Windows\\system32\\x.jsonl", "x.jsonl"),
    "nul byte": ("nul\x00byte.jsonl", "nulbyte.jsonl"),
    "line breaks": ("x.jsonl\r\nContent-Type: text/html", None),  # the extension is no longer .jsonl
    "long": ("a" * 400 + ".jsonl", "a" * 249 + ".jsonl"),  # cut to 255 characters, the extension kept
    "unicode": ("données-日本語-🙂.jsonl", "données-日本語-🙂.jsonl"),
    "markup": (XSS_FILENAME, XSS_FILENAME),
    "only dots": ("..", None),
    "trailing slash": ("../", None),
}


def files_outside(tmp_path: Path, media: Path) -> set[Path]:
    return {path for path in tmp_path.rglob("*") if path.is_file() and not path.is_relative_to(media)}


def assert_stored_inside(dataset: Dataset, media: Path, tmp_path: Path, before: set[Path]) -> None:
    stored = Path(dataset.file.path).resolve()
    assert stored.is_file() and stored.is_relative_to(media.resolve()), stored
    assert stored.parent == (media / "datasets" / str(dataset.owner_id)).resolve()
    assert files_outside(tmp_path, media) == before, "a file was written outside MEDIA_ROOT"
    name = dataset.original_filename
    assert "/" not in name and "\\" not in name and name.isprintable() and 0 < len(name) <= 255, name


@pytest.mark.parametrize("case", HOSTILE_NAMES)
def test_upload_names_in_the_service(case, world, media, tmp_path):
    sent, kept = HOSTILE_NAMES[case]
    before = files_outside(tmp_path, media)
    if kept is None:
        with pytest.raises(ValidationError):
            dataset_services.create_dataset(world.owner, RawUpload(sent, ROWS))
        assert Dataset.objects.filter(owner=world.owner).count() == 1
        return
    dataset = dataset_services.create_dataset(world.owner, RawUpload(sent, ROWS))
    assert dataset.original_filename == kept
    assert_stored_inside(dataset, media, tmp_path, before)
    page = client_for(world.owner).get(f"/datasets/{dataset.pk}/").content.decode()
    assert escape(kept) in page


def raw_multipart(filename: str, data: bytes, name: str = "") -> tuple[bytes, str]:
    """A multipart body with the file name exactly as given (RFC 2231), which Django's test client would cut."""
    boundary = "isolation-boundary-7c1f"
    quoted = urllib.parse.quote(filename, safe="")
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename*=UTF-8\'\'{quoted}\r\n'
             "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"]
    if name:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{name}\r\n'.encode())
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize("endpoint", ["/datasets/upload/", "/api/datasets/"])
@pytest.mark.parametrize("case", HOSTILE_NAMES)
def test_upload_names_through_http(case, endpoint, world, media, tmp_path):
    sent, _kept = HOSTILE_NAMES[case]
    client = client_for(world.owner)
    before = files_outside(tmp_path, media)
    known = set(Dataset.objects.values_list("pk", flat=True))
    payload, content_type = raw_multipart(sent, ROWS)
    response = client.post(endpoint, payload, content_type=content_type)
    assert response.status_code in (201, 302, 400), (response.status_code, response.content[:500])
    created = Dataset.objects.exclude(pk__in=known)
    if response.status_code == 400:
        assert not created.exists() and files_outside(tmp_path, media) == before
        return
    dataset = created.get()
    assert_stored_inside(dataset, media, tmp_path, before)
    for page in ("/datasets/", f"/datasets/{dataset.pk}/"):
        html = client.get(page).content.decode()
        assert escape(dataset.original_filename) in html and escape(dataset.name) in html
        assert "<img src=x" not in html


def test_the_adapter_download_name_never_comes_from_the_user(world):
    job = Job.objects.get(pk=world.ids["job"])
    Job.objects.filter(pk=job.pk).update(dataset_name='../../evil"\r\nX-Injected: 1.zip')
    client = client_for(world.owner)
    for url in (f"/jobs/{job.pk}/adapter/", f"/api/jobs/{job.pk}/adapter/"):
        response = client.get(url)
        assert response.status_code == 200 and response["Content-Type"] == "application/zip"
        assert response["Content-Disposition"] == f'attachment; filename="adapter-job-{job.pk}.zip"'
        assert "X-Injected" not in response
