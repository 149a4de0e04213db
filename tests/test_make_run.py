"""`make run` on a fresh data directory: it comes up, a user logs in, the local trunk is
healthy, a short job on the demo dataset succeeds; SIGTERM stops every child; a second
run keeps the data and does not show the password again."""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT

from splitcore.model.default_model import DEFAULT_MODEL_NAME
from webapp.processes import free_port

READY = "splitlearn-studio is ready"


class Browserless:
    """A cookie-keeping HTTP client that logs in through the login form, like a browser."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.cookies = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies))

    def csrf(self) -> str:
        return next(c.value for c in self.cookies if c.name == "csrftoken")

    def request(self, path: str, data: dict | None = None, as_json: bool = False):
        headers = {}
        body = None
        if data is not None:
            headers["X-CSRFToken"] = self.csrf()
            headers["Referer"] = self.base + path
            if as_json:
                body, headers["Content-Type"] = json.dumps(data).encode(), "application/json"
            else:
                body = urllib.parse.urlencode(data).encode()
        return self.opener.open(urllib.request.Request(self.base + path, data=body, headers=headers), timeout=60)

    def log_in(self, username: str, password: str) -> None:
        page = self.request("/accounts/login/").read().decode()
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
        response = self.request("/accounts/login/", {"csrfmiddlewaretoken": token, "username": username,
                                                     "password": password})
        assert response.url.endswith("/jobs/"), "logged in, the browser lands on the job list"

    def api(self, path: str, data: dict | None = None):
        return json.loads(self.request(path, data, as_json=True).read())


def session_processes(session_id: int) -> list[int]:
    """Processes still alive in a session (the launcher and every child it started)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session_id and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def celery_workers(session_id: int) -> dict[str, tuple[str, str]]:
    """The Celery workers of a session: node name -> (queues, concurrency), from their command lines."""
    workers = {}
    for pid in session_processes(session_id):
        try:
            words = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if words[1:5] == ["-m", "celery", "-A", "webapp"] and words[5] == "worker":  # pool children repeat it
            workers[words[words.index("-n") + 1]] = (words[words.index("-Q") + 1],
                                                     words[words.index("--concurrency") + 1])
    return workers


def start_make_run(env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(["make", "run"], cwd=PROJECT_ROOT, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(process: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if READY in text:
            return text
        if process.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(f"make run did not get ready:\n{log.read_text(errors='replace')[-4000:]}")


def stop(process: subprocess.Popen) -> None:
    """What Ctrl-C at a terminal does: the signal goes to the whole process group."""
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(120)
    deadline = time.monotonic() + 30
    while session_processes(process.pid) and time.monotonic() < deadline:
        time.sleep(0.5)


@pytest.mark.default_model
def test_make_run_serves_the_whole_application_and_stops_cleanly(default_model_dir, tmp_path):
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    (data / "models" / DEFAULT_MODEL_NAME).symlink_to(default_model_dir)  # prepared once per test session
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", "DJANGO_SETTINGS_MODULE")}
    env.update(SPLITLEARN_DATA_DIR=str(data), PORT=str(port), REDIS_PORT=str(free_port()),
               TRUNK_PORT=str(free_port()), WORKER_CONCURRENCY="1")

    first = start_make_run(env, tmp_path / "first.log")
    try:
        output = wait_ready(first, tmp_path / "first.log")
        password = re.search(r"log in as 'admin' with password (\S+) ", output).group(1)
        # One worker per queue: health checks, sweeps and generations never wait behind training jobs or builds.
        assert celery_workers(first.pid) == {"training-worker@%h": ("training", "1"),
                                             "generation-worker@%h": ("generation", "1"),
                                             "merge-worker@%h": ("merge", "1"),
                                             "control-worker@%h": ("control", "2")}
        logs = data / "run" / "logs"
        for queue in ("training", "generation", "merge", "control"):
            assert " ready." in (logs / f"{queue}-worker.log").read_text(), queue
        client = Browserless(f"http://127.0.0.1:{port}")
        client.log_in("admin", password)
        trunks = client.api("/api/trunks/")["results"]
        assert [(t["name"], t["status"], t["model_id"]) for t in trunks] == [("local", "up", DEFAULT_MODEL_NAME)]
        assert "token" not in json.dumps(trunks)
        datasets = client.api("/api/datasets/")["results"]
        assert [d["kind"] for d in datasets] == ["messages"] and datasets[0]["num_examples"] == 48
        job = client.api("/api/jobs/", {"dataset": datasets[0]["id"], "max_steps": 2, "batch_size": 2,
                                        "max_seq_length": 64})
        deadline = time.monotonic() + 300
        while job["status"] not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
            time.sleep(1)
            job = client.api(f"/api/jobs/{job['id']}/")
        assert job["status"] == "succeeded", job["error_message"]
        assert job["adapter_url"]
    finally:
        stop(first)
    assert first.returncode == 0 or first.returncode == -signal.SIGTERM
    assert "stopped" in (tmp_path / "first.log").read_text()
    assert session_processes(first.pid) == [], "no child process is left behind"

    second = start_make_run(env, tmp_path / "second.log")
    try:
        output = wait_ready(second, tmp_path / "second.log")
        assert "password was printed on the first run" in output and password not in output
        client = Browserless(f"http://127.0.0.1:{port}")
        client.log_in("admin", password)
        assert [j["status"] for j in client.api("/api/jobs/")["results"]] == ["succeeded"], "the data is kept"
    finally:
        stop(second)
    assert session_processes(second.pid) == []
