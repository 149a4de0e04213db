"""``make run``: the whole application on one machine, from embedded defaults.

Prepares the default model, migrates, creates an admin account (its generated password
is printed once, on the first run), loads the bundled demo dataset, and starts an
embedded Redis, a trunk server (with a generated token shared with the registered trunk
row), three Celery workers (training jobs, playground generations, and control tasks: health
checks and sweeps, each on its own queue so that nothing waits behind a long job), beat and
daphne (HTTP and WebSockets; static files through WhiteNoise, no proxy in front). It waits until
each one answers, prints the URL and the login, and stops every child on Ctrl-C or SIGTERM. A
second run keeps the data.

Settings (environment): ``SPLITLEARN_DATA_DIR`` (./data), ``HOST`` (127.0.0.1),
``PORT`` (8000), ``REDIS_PORT`` (6390), ``TRUNK_PORT`` (50151), ``TRUNK_BOTTOM_LAYERS`` and
``TRUNK_TOP_LAYERS`` (2 and 2, the default cut), ``TRUNK_MIN_BOTTOM_LAYERS`` and
``TRUNK_MIN_TOP_LAYERS`` (1 and 1: jobs may choose any cut that keeps at least that many
blocks on each side), ``TRUNK_DEVICE`` (auto: a GPU when there is one) and ``TRUNK_DTYPE``
(fp32), ``WORKER_CONCURRENCY`` (2: training jobs at once), ``GENERATION_CONCURRENCY`` (1:
playground generations at once). Each job or generation slot is a process that loads its base model.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from splitcore.cli.stop_signal import StopSignal
from splitcore.model.devices import DEVICE_NAME, DEVICES, DTYPES

from .env import env_int, env_match, env_path, env_str

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ADMIN_USERNAME = "admin"
LOCAL_TRUNK = "local"
TRUNK_DTYPE = re.compile(f"^({'|'.join(DTYPES)})$")
# Control tasks load no model and are short; two, so that a health check waiting on a silent
# trunk does not hold up the sweeps.
CONTROL_CONCURRENCY = 2
# Merged builds read and rewrite a whole model: one at a time, beside (never ahead of) the playground.
MERGE_CONCURRENCY = 1


@dataclass(frozen=True)
class LauncherConfig:
    data_dir: Path
    host: str
    port: int
    redis_port: int
    trunk_port: int
    bottom_layers: int
    top_layers: int
    min_bottom_layers: int
    min_top_layers: int
    trunk_device: str
    trunk_dtype: str
    worker_concurrency: int
    generation_concurrency: int

    @classmethod
    def from_env(cls) -> LauncherConfig:
        return cls(
            data_dir=env_path("SPLITLEARN_DATA_DIR", PROJECT_ROOT / "data"),
            host=env_str("HOST", "127.0.0.1"),
            port=env_int("PORT", 8000, 1, 65535),
            redis_port=env_int("REDIS_PORT", 6390, 1, 65535),
            trunk_port=env_int("TRUNK_PORT", 50151, 1, 65535),
            bottom_layers=env_int("TRUNK_BOTTOM_LAYERS", 2, 1),
            top_layers=env_int("TRUNK_TOP_LAYERS", 2, 1),
            min_bottom_layers=env_int("TRUNK_MIN_BOTTOM_LAYERS", 1, 1),
            min_top_layers=env_int("TRUNK_MIN_TOP_LAYERS", 1, 1),
            trunk_device=env_match("TRUNK_DEVICE", "auto", DEVICE_NAME, DEVICES),
            trunk_dtype=env_match("TRUNK_DTYPE", "fp32", TRUNK_DTYPE, ", ".join(DTYPES)),
            worker_concurrency=env_int("WORKER_CONCURRENCY", 2, 1, 64),
            generation_concurrency=env_int("GENERATION_CONCURRENCY", 1, 1, 64),
        )


def _secret(path: Path) -> str:
    """A generated secret kept in the data directory (readable by its owner only)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(36))
    return path.read_text().strip()


def say(text: str) -> None:
    print(text, flush=True)


class Launcher:
    def __init__(self, config: LauncherConfig) -> None:
        self.config = config
        self.run_dir = config.data_dir / "run"
        self.log_dir = self.run_dir / "logs"
        self.children: list = []
        self.env: dict[str, str] = {}

    @property
    def secret_key_file(self) -> Path:
        """The generated Django key; the settings read it when SECRET_KEY is unset (settings.LAUNCHER_SECRET_KEY_FILE),
        so `manage.py` commands work on this data directory without exporting it."""
        return self.run_dir / "secret_key"

    def prepare(self) -> None:
        from splitcore.model import default_model

        self.log_dir.mkdir(parents=True, exist_ok=True)
        say("preparing the default model (the first time takes about a minute)...")
        self.model_dir = default_model.prepare_default_model(self.config.data_dir)
        self.env = {
            "SPLITLEARN_DATA_DIR": str(self.config.data_dir),
            "SECRET_KEY": os.environ.get("SECRET_KEY") or _secret(self.secret_key_file),
            "REDIS_URL": f"redis://127.0.0.1:{self.config.redis_port}/0",
            "DEFAULT_BASE_MODEL": self.model_dir.name,
            "ALLOWED_HOSTS": os.environ.get("ALLOWED_HOSTS", f"127.0.0.1,localhost,{self.config.host}"),
        }
        os.environ.update(self.env)
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)

    def admin_login(self) -> str:
        from django.contrib.auth import get_user_model

        users = get_user_model()
        if users.objects.filter(username=ADMIN_USERNAME).exists():
            return f"log in as '{ADMIN_USERNAME}' (the password was printed on the first run)"
        password = secrets.token_urlsafe(12)
        users.objects.create_superuser(ADMIN_USERNAME, email="", password=password)
        return f"log in as '{ADMIN_USERNAME}' with password {password} (shown only this once: note it)"

    def demo_dataset(self) -> None:
        from django.contrib.auth import get_user_model

        from .datasets.demo import add_demo_dataset

        add_demo_dataset(get_user_model().objects.get(username=ADMIN_USERNAME))

    def start_services(self) -> None:
        from splitcore.remote.process import start_trunk

        from django.conf import settings

        from .processes import start_beat, start_redis, start_web_server, start_worker

        config = self.config
        say(f"starting redis on 127.0.0.1:{config.redis_port}...")
        self.children.append(start_redis(self.run_dir / "redis", port=config.redis_port))
        token = _secret(self.run_dir / "trunk_token")
        say(f"starting the trunk server on 127.0.0.1:{config.trunk_port}...")
        trunk = start_trunk(self.model_dir, self.log_dir, "--port", str(config.trunk_port),
                            "--min-bottom-layers", str(min(config.min_bottom_layers, config.bottom_layers)),
                            "--min-top-layers", str(min(config.min_top_layers, config.top_layers)),
                            "--device", config.trunk_device, "--dtype", config.trunk_dtype,
                            token=token, n_bottom=config.bottom_layers, n_top=config.top_layers)
        self.children.append(trunk)
        if trunk.metrics_url:
            say(f"the trunk server's metrics: {trunk.metrics_url}")
        self._register_trunk(trunk.address, token)
        say("starting the Celery workers (training, generation, merge, control) and beat...")
        for queue, concurrency in ((settings.TRAINING_QUEUE, config.worker_concurrency),
                                   (settings.GENERATION_QUEUE, config.generation_concurrency),
                                   (settings.MERGE_QUEUE, MERGE_CONCURRENCY),
                                   (settings.CONTROL_QUEUE, CONTROL_CONCURRENCY)):
            self.children.append(start_worker(self.env, self.log_dir / f"{queue}-worker.log", name=f"{queue}-worker",
                                              concurrency=concurrency, queues=[queue]))
        self.children.append(start_beat(self.env, self.log_dir / "beat.log", self.run_dir / "celerybeat-schedule"))
        say(f"starting the web server on {config.host}:{config.port}...")
        self.children.append(start_web_server(self.env, self.log_dir / "web.log", host=config.host,
                                              port=config.port))

    def _register_trunk(self, address: str, token: str) -> None:
        from .trunks.health import check_trunk
        from .trunks.models import TrunkServer

        trunk, _ = TrunkServer.objects.update_or_create(
            name=LOCAL_TRUNK, defaults={"address": address, "token": token, "use_tls": False, "enabled": True})
        check_trunk(trunk, timeout_s=30)
        if trunk.status != TrunkServer.Status.UP:
            raise RuntimeError(f"the local trunk server does not answer: {trunk.last_error}")

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children.clear()


def main() -> int:
    config = LauncherConfig.from_env()
    launcher = Launcher(config)
    stopping = StopSignal()
    try:
        launcher.prepare()
        login = launcher.admin_login()
        launcher.demo_dataset()
        launcher.start_services()
    except Exception as exc:  # noqa: BLE001 - report, stop what started, exit non-zero
        say(f"error: {exc}")
        launcher.stop()
        return 1
    say("")
    say(f"splitlearn-studio is ready: http://{config.host}:{config.port}/")
    say(f"  {login}")
    say(f"  data in {config.data_dir}, logs in {launcher.log_dir}; Ctrl-C stops everything")
    while not stopping.wait(1.0):
        dead = [child for child in launcher.children if child.process.poll() is not None]
        if dead:
            say(f"error: a service stopped unexpectedly (exit {dead[0].process.returncode}); see {launcher.log_dir}")
            break
    say("stopping...")
    launcher.stop()
    say("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
