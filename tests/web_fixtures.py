"""Fixtures for the web tests: data directories, a real Redis, a real Celery worker, a real trunk.

Loaded as a pytest plugin from conftest.py. The worker is a separate process that reads
the same (file) test database and the same directories as the test process.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import TEST_SECRET_KEY
from polling import wait_until
from web_services import start_redis, start_web_server, start_worker

from splitcore.remote.process import start_trunk

TINY_MODEL_ID = "tiny-llama"
WORKER_TRUNK_WAIT_S = 4


@pytest.fixture(scope="session")
def web_dirs(tmp_path_factory, tiny_dirs) -> dict[str, Path]:
    """Media, jobs and models directories for the whole session, set in the settings too."""
    from django.conf import settings

    root = tmp_path_factory.mktemp("web")
    dirs = {name: root / name for name in ("media", "jobs", "models", "logs")}
    for path in dirs.values():
        path.mkdir()
    shutil.copytree(tiny_dirs["llama"], dirs["models"] / TINY_MODEL_ID)
    settings.MEDIA_ROOT = str(dirs["media"])
    settings.JOBS_DIR = dirs["jobs"]
    settings.MODELS_DIR = dirs["models"]
    settings.DEFAULT_BASE_MODEL = TINY_MODEL_ID
    # A file storage made before this point keeps the MEDIA_ROOT it first read, unless told of the change.
    from django.test.signals import setting_changed

    setting_changed.send(sender=type(settings), setting="MEDIA_ROOT", value=settings.MEDIA_ROOT, enter=True)
    return dirs


@pytest.fixture(autouse=True)
def _files_in_the_session_dirs(request):
    """A test with the database stores its files (datasets, jobs) in the session's directories, never in the
    project's data/ folder, whichever test made the file storage first."""
    if request.node.get_closest_marker("django_db") or {"db", "transactional_db"} & set(request.fixturenames):
        request.getfixturevalue("web_dirs")


@pytest.fixture
def owner(django_user_model):
    """The user whose objects a test creates (password ``owner-pass-123``)."""
    return django_user_model.objects.create_user("owner", password="owner-pass-123")


@pytest.fixture
def other(django_user_model):
    """A second user, who must see none of the owner's objects."""
    return django_user_model.objects.create_user("other", password="other-pass-123")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    from channels.layers import channel_layers
    from django.conf import settings
    from django.core.cache import caches

    from webapp import settings as settings_module
    from webapp.celery import app

    server = start_redis(tmp_path_factory.mktemp("redis"))
    app.conf.broker_url = server.url
    settings.CHANNEL_LAYERS["default"]["CONFIG"]["hosts"] = [settings_module.channel_layer_host(server.url)]
    channel_layers.backends.clear()  # layers built before this point would talk to another Redis
    # The cache (log-in throttling) too; the web and worker processes get it from REDIS_URL.
    settings.CACHES["default"]["LOCATION"] = server.url
    try:
        del caches["default"]  # a cache made before this point would talk to another Redis
    except AttributeError:
        pass  # none made yet
    yield server
    server.stop()


@pytest.fixture(scope="session")
def service_env(django_db_setup, web_dirs, redis_server) -> dict[str, str]:
    """The environment of the worker and web processes: the test database, Redis and directories, and the
    tests' fixed SECRET_KEY (conftest.py)."""
    from django.conf import settings

    return {
        "DATABASE_URL": f"sqlite:///{settings.DATABASES['default']['NAME']}",
        "CELERY_BROKER_URL": redis_server.url,
        "REDIS_URL": redis_server.url,
        "SPLITLEARN_MODELS_DIR": str(web_dirs["models"]),
        "SPLITLEARN_JOBS_DIR": str(web_dirs["jobs"]),
        "MEDIA_ROOT": str(web_dirs["media"]),
        "DEFAULT_BASE_MODEL": TINY_MODEL_ID,
        "TRUNK_WAIT_S": str(WORKER_TRUNK_WAIT_S),
        "JOB_CHECKPOINT_EVERY": "2",
        "SECRET_KEY": TEST_SECRET_KEY,
    }


@pytest.fixture(scope="session")
def celery_worker(service_env, web_dirs):
    worker = start_worker(service_env, web_dirs["logs"] / "worker.log")
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def web_server(service_env, web_dirs):
    """daphne serving the ASGI application (HTTP and WebSockets) on a free loopback port."""
    server = start_web_server(service_env, web_dirs["logs"] / "web.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def web_trunk(web_dirs):
    # Sessions may keep 1 to 4 blocks before the trunk (the default cut is 2 + 2 of 6).
    process = start_trunk(web_dirs["models"] / TINY_MODEL_ID, web_dirs["logs"], "--max-sessions", "4",
                          "--min-bottom-layers", "1", "--min-top-layers", "1")
    yield process
    process.stop()


@pytest.fixture
def registered_trunk(web_trunk, db):
    """The session's trunk registered in this test's database, checked and up."""
    from webapp.trunks.health import check_trunk
    from webapp.trunks.models import TrunkServer

    trunk = TrunkServer.objects.create(name="local", address=web_trunk.address, token=web_trunk.token)
    check_trunk(trunk)
    assert trunk.status == TrunkServer.Status.UP, trunk.last_error
    return trunk


def wait_for_job(job_id: int, statuses=("succeeded", "failed", "cancelled"), timeout: float = 180,
                 condition=None, worker=None):
    """Poll the database until the job reaches one of ``statuses`` (or ``condition(job)`` holds)."""
    from webapp.training.models import Job

    job = None

    def reached() -> bool:
        nonlocal job
        job = Job.objects.get(pk=job_id)
        return condition(job) if condition else job.status in statuses

    def seen() -> str:
        log = worker.log()[-4000:] if worker else ""
        return f"{job.status if job else '?'} at step {job.current_step if job else '?'}\n{log}"

    what = f"job {job_id} meets the test's condition" if condition else f"job {job_id} is {' or '.join(statuses)}"
    wait_until(reached, what, timeout=timeout, observed=seen, interval=0.2)
    return job
