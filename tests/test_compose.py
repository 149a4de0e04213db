"""The deployment files: docker-compose.yml, the Dockerfile, .dockerignore and .env.example.

nginx's own configuration (deploy/nginx/) is checked by tests/test_nginx_config.py and, in front of a real
daphne, by tests/test_nginx_proxy.py; here: how compose wires it to the web service.

No docker engine runs here, but Debian's ``docker-compose`` (1.29) validates, interpolates
and normalises a compose file without one; ``make test`` installs it. Without the binary
these tests fail rather than skip: the deployment must not go unchecked.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
SETTINGS_FILE = ROOT / "webapp" / "settings.py"

NGINX_IMAGE = "nginx:1.30-alpine"  # the official image, stable branch (nginx 1.30, Alpine)
# The web service's daphne, behind nginx: it trusts nginx's X-Forwarded-For and X-Forwarded-Proto.
DAPHNE_COMMAND = "daphne --proxy-headers --bind 0.0.0.0 --port 8000 webapp.asgi:application"
# One Celery worker per queue of webapp/settings.py (name -> queue); only the control worker loads no model.
WORKER_QUEUES = {"training-worker": "training", "generation-worker": "generation", "merge-worker": "merge",
                 "control-worker": "control"}
DJANGO_SERVICES = ("web", *WORKER_QUEUES, "beat")
APP_SERVICES = (*DJANGO_SERVICES, "trunk", "prepare-model")
TEST_SECRETS = {
    "SECRET_KEY": "compose-test-secret-key-0123456789abcdef",
    "POSTGRES_PASSWORD": "compose-test-db-password",
    "TRUNK_TOKEN": "compose-test-trunk-token-0123456789",
}
FALSE_VALUES = {"0", "false", "no", "off"}  # what webapp.env.env_bool reads as off

# Names read from the environment: the typed helpers of webapp/env.py and os.environ / os.getenv.
SETTING_PATTERNS = (
    re.compile(r"\benv_(?:str|bool|int|float|list|path)\(\s*['\"]([A-Z][A-Z0-9_]*)['\"]"),
    re.compile(r"\bos\.environ(?:\.get|\.setdefault)?[\[(]\s*['\"]([A-Z][A-Z0-9_]*)['\"]"),
    re.compile(r"\bos\.getenv\(\s*['\"]([A-Z][A-Z0-9_]*)['\"]"),
)
# A variable interpolated by compose; `$$` escapes a dollar for the container's shell.
COMPOSE_VARIABLE = re.compile(r"(?<!\$)\$\{([A-Z][A-Z0-9_]*)")
# A documented variable: `NAME=value`, or `# NAME=value` for those docker-compose.yml sets itself.
DOCUMENTED_VARIABLE = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=", re.MULTILINE)


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def docker_compose() -> str:
    path = shutil.which("docker-compose")
    if path is None:
        pytest.fail("docker-compose is not installed: `make test` installs Debian's package when run as root "
                    "(or: apt-get install docker-compose)")
    return path


def write_env_file(path: Path, values: dict[str, str]) -> Path:
    path.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    return path


def run_compose(docker_compose: str, env_file: Path, *args: str,
                compose_file: Path = COMPOSE_FILE) -> subprocess.CompletedProcess:
    """docker-compose in a clean environment: the caller's variables would override the env file."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(env_file.parent), "LANG": "C.UTF-8"}
    return subprocess.run([docker_compose, "--env-file", str(env_file), "-f", str(compose_file), *args],
                          env=env, capture_output=True, text=True, timeout=120)


def normalized_config(docker_compose: str, env_file: Path, compose_file: Path = COMPOSE_FILE) -> dict:
    result = run_compose(docker_compose, env_file, "config", compose_file=compose_file)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def command_words(service: dict) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(word) for word in command]


def mounts(service: dict) -> dict[str, str]:
    """Named volume -> path in the container."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source"), volume["target"]
        found[source] = target
    return found


def env_example_values() -> dict[str, str]:
    """The active (uncommented) assignments of .env.example."""
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value
    return values


def documented_variables() -> set[str]:
    return set(DOCUMENTED_VARIABLE.findall(ENV_EXAMPLE.read_text()))


def settings_variables() -> set[str]:
    text = SETTINGS_FILE.read_text()
    return {name for pattern in SETTING_PATTERNS for name in pattern.findall(text)} - {"DJANGO_SETTINGS_MODULE"}


@pytest.fixture(scope="module")
def secrets_env_file(tmp_path_factory) -> Path:
    return write_env_file(tmp_path_factory.mktemp("compose") / "test.env", TEST_SECRETS)


@pytest.fixture(scope="module")
def config(docker_compose, secrets_env_file) -> dict:
    return normalized_config(docker_compose, secrets_env_file)


@pytest.fixture(scope="module")
def example_config(docker_compose, tmp_path_factory) -> dict:
    """The configuration from .env.example with its secrets filled in, as a user would."""
    values = {**env_example_values(), **TEST_SECRETS}
    return normalized_config(docker_compose, write_env_file(tmp_path_factory.mktemp("example") / ".env", values))


# ---------------------------------------------------------------- docker-compose.yml


def test_compose_file_is_valid(docker_compose, secrets_env_file):
    result = run_compose(docker_compose, secrets_env_file, "config", "-q")
    assert result.returncode == 0, result.stderr


def test_services_use_official_images_and_one_shared_application_image(config):
    services = config["services"]
    assert set(services) >= {"redis", "postgres", *APP_SERVICES}
    assert services["redis"]["image"].partition(":")[0] == "redis"  # official: no registry, no namespace
    assert services["postgres"]["image"].partition(":")[0] == "postgres"
    assert services["nginx"]["image"] == NGINX_IMAGE  # official, and pinned to a release branch
    images = {services[name]["image"] for name in APP_SERVICES}
    contexts = {Path(services[name]["build"]["context"]).resolve() for name in APP_SERVICES}
    assert len(images) == 1, images
    assert contexts == {ROOT}
    assert (ROOT / "Dockerfile").is_file()


def test_django_services_run_without_debug_and_take_secrets_from_the_environment(config):
    services = config["services"]
    for name in DJANGO_SERVICES:
        env = services[name]["environment"]
        assert str(env["DEBUG"]).lower() in FALSE_VALUES, name
        assert env["SECRET_KEY"] == TEST_SECRETS["SECRET_KEY"], name
        database = urlsplit(env["DATABASE_URL"])
        assert (database.scheme, database.hostname, database.port) == ("postgres", "postgres", 5432), name
        assert database.password == TEST_SECRETS["POSTGRES_PASSWORD"], name
        assert env["REDIS_URL"] == "redis://redis:6379/0", name
        assert "ALLOWED_HOSTS" in env and "CSRF_TRUSTED_ORIGINS" in env, name
        assert str(env["WHITENOISE_USE_FINDERS"]).lower() in FALSE_VALUES, name  # static files collected in the image
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == TEST_SECRETS["POSTGRES_PASSWORD"]
    trunk_env = services["trunk"]["environment"]
    assert trunk_env["TRUNK_TOKEN"] == TEST_SECRETS["TRUNK_TOKEN"]
    assert "SECRET_KEY" not in trunk_env and "DATABASE_URL" not in trunk_env  # the trunk needs no web secret


def test_data_lives_on_named_volumes_where_the_settings_point(config):
    services = config["services"]
    assert set(config["volumes"]) >= {"static", "media", "jobs", "models", "postgres-data", "redis-data",
                                      "beat-schedule"}
    for name in ("web", "training-worker", "generation-worker", "merge-worker"):
        env, mounted = services[name]["environment"], mounts(services[name])
        assert mounted["media"] == env["MEDIA_ROOT"], name
        assert mounted["jobs"] == env["SPLITLEARN_JOBS_DIR"], name
        assert mounted["models"] == env["SPLITLEARN_MODELS_DIR"], name
    # prepare-model writes DATA_DIR/models/<model>, the trunk loads it from the same volume.
    prepare = services["prepare-model"]
    assert mounts(prepare)["models"] == f"{prepare['environment']['SPLITLEARN_DATA_DIR']}/models"
    trunk_words = command_words(services["trunk"])
    model_path = trunk_words[trunk_words.index("--model") + 1]
    assert Path(model_path).parent == Path(mounts(services["trunk"])["models"])
    assert mounts(services["postgres"])["postgres-data"] == "/var/lib/postgresql/data"
    assert "redis-data" in mounts(services["redis"])
    beat_words = command_words(services["beat"])
    schedule = Path(beat_words[beat_words.index("--schedule") + 1])
    assert schedule.parent == Path(mounts(services["beat"])["beat-schedule"])


def test_each_service_runs_its_process(config):
    services = config["services"]
    web = " ".join(command_words(services["web"]))
    assert "manage.py migrate --noinput" in web and "manage.py collectstatic --noinput" in web
    assert web.index("migrate") < web.index("collectstatic") < web.index(f"exec {DAPHNE_COMMAND}")
    assert "ports" not in services["web"], "clients reach web through nginx only (it trusts nginx's headers)"
    assert {"postgres", "redis"} <= set(services["web"]["depends_on"])
    for name, queue in WORKER_QUEUES.items():
        words = command_words(services[name])
        assert words[:4] == ["celery", "-A", "webapp", "worker"], name
        assert words[words.index("-Q") + 1] == queue, name
        assert "--concurrency" in words, name
    assert command_words(services["beat"])[:4] == ["celery", "-A", "webapp", "beat"]
    trunk = command_words(services["trunk"])
    assert trunk[:3] == ["python", "-m", "trunk_server"]
    for flag, value in {"--host": "0.0.0.0", "--port": "50051", "--bottom-layers": "2", "--top-layers": "2"}.items():
        assert trunk[trunk.index(flag) + 1] == value, flag
    assert trunk[trunk.index("--model") + 1].endswith("/SmolLM2-135M-Instruct")
    assert command_words(services["prepare-model"]) == ["python", "-m", "splitcore", "prepare-model"]
    assert services["prepare-model"]["restart"] == "no"
    for name in ("redis", "postgres", "web", "trunk"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def published_ports(service: dict) -> dict[int, int]:
    """Port in the container -> port of the host."""
    return {int(port["target"]): int(port["published"]) for port in service.get("ports", [])}


def test_nginx_fronts_web_with_the_static_volume_and_the_same_upload_limit(example_config):
    services = example_config["services"]
    nginx, web = services["nginx"], services["web"]
    env = nginx["environment"]
    values = env_example_values()
    assert published_ports(nginx) == {80: int(values["WEB_PORT"]), 443: int(values["WEB_TLS_PORT"])}
    assert env["SPLITLEARN_HTTPS_PUBLIC_PORT"] == values["WEB_TLS_PORT"], "plain HTTP redirects to the host's port"
    assert nginx["depends_on"]["web"]["condition"] == "service_healthy", "web fills the static volume first"
    # daphne's address on the compose network; nginx looks it up per request through Docker's DNS.
    words = shlex.split(command_words(web)[-1])  # sh -c "..."
    assert env["SPLITLEARN_WEB_UPSTREAM"] == f"web:{words[words.index('--port') + 1]}"
    assert str(env["NGINX_ENTRYPOINT_LOCAL_RESOLVERS"]) == "1"
    # The static files web collects are what nginx serves, read-only.
    assert mounts(web)["static"] == web["environment"]["STATIC_ROOT"]
    assert mounts(nginx)["static"] == env["SPLITLEARN_STATIC_ROOT"]
    assert "static:/srv/splitlearn/static:ro" in nginx["volumes"]
    # One setting drives both limits: nginx's client_max_body_size and the web app's MAX_REQUEST_BYTES.
    assert env["DATASET_MAX_UPLOAD_MB"] == web["environment"]["DATASET_MAX_UPLOAD_MB"]
    assert env["DATASET_MAX_UPLOAD_MB"] == values["DATASET_MAX_UPLOAD_MB"]
    # deploy/nginx mounted where the image reads it; the script runs only when executable.
    binds = {volume.split(":")[1]: Path(volume.split(":")[0]) for volume in nginx["volumes"]
             if volume.startswith("/")}
    assert binds["/etc/nginx/templates"] == ROOT / "deploy" / "nginx" / "templates"
    script = binds["/docker-entrypoint.d/18-splitlearn.envsh"]
    assert script == ROOT / "deploy" / "nginx" / "18-splitlearn.envsh" and os.access(script, os.X_OK)
    assert binds["/etc/nginx/certs"] == (ROOT / values["TLS_CERT_DIR"]).resolve()
    assert all(volume.endswith(":ro") for volume in nginx["volumes"]), "nginx writes none of its mounts"


def test_nginx_follows_the_env_file(docker_compose, tmp_path):
    values = {**TEST_SECRETS, "DATASET_MAX_UPLOAD_MB": "7", "WEB_PORT": "80", "WEB_TLS_PORT": "443",
              "TLS_CERT_DIR": "/etc/ssl/studio"}
    services = normalized_config(docker_compose, write_env_file(tmp_path / ".env", values))["services"]
    nginx = services["nginx"]
    assert nginx["environment"]["DATASET_MAX_UPLOAD_MB"] == services["web"]["environment"]["DATASET_MAX_UPLOAD_MB"]
    assert nginx["environment"]["DATASET_MAX_UPLOAD_MB"] == "7"
    assert published_ports(nginx) == {80: 80, 443: 443}
    assert nginx["environment"]["SPLITLEARN_HTTPS_PUBLIC_PORT"] == "443"
    assert "/etc/ssl/studio:/etc/nginx/certs:ro" in nginx["volumes"]


def test_one_worker_per_queue_with_its_own_concurrency(example_config, settings):
    """Generations and control tasks never wait behind training jobs or merged builds: each queue has its workers."""
    services = example_config["services"]
    assert set(WORKER_QUEUES.values()) == set(settings.ALL_QUEUES)
    values = env_example_values()
    concurrency = {}
    for name, queue in WORKER_QUEUES.items():
        words = command_words(services[name])
        concurrency[queue] = words[words.index("--concurrency") + 1]
        assert words[words.index("-n") + 1] == f"{queue}@%h", "distinct node names on one host"
    assert concurrency == {"training": values["WORKER_CONCURRENCY"], "generation": values["GENERATION_CONCURRENCY"],
                           "merge": "1", "control": "2"}
    assert mounts(services["control-worker"]) == {}, "health checks and sweeps need no model, no data"
    assert "prepare-model" not in services["control-worker"]["depends_on"]


@pytest.mark.parametrize("missing", sorted(TEST_SECRETS))
def test_a_missing_secret_stops_compose_and_names_it(docker_compose, tmp_path, missing):
    others = {name: value for name, value in TEST_SECRETS.items() if name != missing}
    result = run_compose(docker_compose, write_env_file(tmp_path / "partial.env", others), "config", "-q")
    assert result.returncode != 0
    assert f"{missing} is not set" in result.stderr + result.stdout


def test_secrets_have_no_default_in_the_compose_file():
    text = COMPOSE_FILE.read_text()
    for name in TEST_SECRETS:
        uses = re.findall(r"\$\{" + name + r"([^}]*)\}", text)
        assert uses, f"{name} is not taken from the environment"
        assert all(use.startswith(":?") for use in uses), f"{name} must be required (${{{name}:?message}})"


def test_the_gpu_variant_of_the_trunk_is_valid(docker_compose, secrets_env_file, tmp_path):
    """Swap the trunk service for its commented GPU variant, as the comment says, and validate."""
    lines = COMPOSE_FILE.read_text().splitlines()
    start = lines.index("  trunk:")
    gpu_start = lines.index("  # trunk:")
    gpu_end = next(i for i in range(gpu_start, len(lines)) if not lines[i].startswith("  #"))
    gpu_service = [line.replace("  # ", "  ", 1) for line in lines[gpu_start:gpu_end]]
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("  ") and not lines[i].startswith("    "))
    variant = tmp_path / "docker-compose.yml"
    variant.write_text("\n".join(lines[:start] + lines[end:gpu_start] + gpu_service + lines[gpu_end:]) + "\n")
    trunk = normalized_config(docker_compose, secrets_env_file, compose_file=variant)["services"]["trunk"]
    devices = trunk["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert trunk["environment"]["TRUNK_TOKEN"] == TEST_SECRETS["TRUNK_TOKEN"]
    assert command_words(trunk)[:3] == ["python", "-m", "trunk_server"]


# ---------------------------------------------------------------- .env.example


def test_env_example_leaves_the_secrets_empty_so_an_unedited_copy_is_refused(docker_compose):
    values = env_example_values()
    for name in TEST_SECRETS:
        assert values.get(name) == "", f"{name} must be listed in .env.example without a value"
    result = run_compose(docker_compose, ENV_EXAMPLE, "config", "-q")
    assert result.returncode != 0
    assert "is not set" in result.stderr


def test_every_setting_read_by_the_web_app_is_documented_in_env_example():
    read = settings_variables()
    assert {"SECRET_KEY", "DEBUG", "DATABASE_URL", "ALLOWED_HOSTS"} <= read, "the settings pattern finds nothing"
    missing = sorted(read - documented_variables())
    assert not missing, f"add these settings of webapp/settings.py to .env.example (with a comment): {missing}"


def test_every_compose_variable_is_documented_in_env_example():
    used = set(COMPOSE_VARIABLE.findall(COMPOSE_FILE.read_text()))
    assert set(TEST_SECRETS) <= used
    missing = sorted(used - documented_variables())
    assert not missing, f"add these variables of docker-compose.yml to .env.example (with a comment): {missing}"


def test_the_settings_accept_the_environment_compose_gives_the_web_app(example_config, tmp_path):
    """Load webapp.settings with the web service's environment from .env.example (paths moved to tmp)."""
    env = {name: str(value) for name, value in example_config["services"]["web"]["environment"].items()}
    env.update(
        SPLITLEARN_DATA_DIR=str(tmp_path / "data"), SPLITLEARN_MODELS_DIR=str(tmp_path / "models"),
        SPLITLEARN_JOBS_DIR=str(tmp_path / "jobs"), MEDIA_ROOT=str(tmp_path / "media"),
        STATIC_ROOT=str(tmp_path / "static"), PATH=os.environ.get("PATH", ""), HOME=str(tmp_path),
        DJANGO_SETTINGS_MODULE="webapp.settings",
    )
    code = ("import json; from django.conf import settings as s; db = s.DATABASES['default']; "
            "print(json.dumps({'debug': s.DEBUG, 'engine': db['ENGINE'], 'host': db['HOST'], "
            "'broker': s.CELERY_BROKER_URL, 'finders': s.WHITENOISE_USE_FINDERS, 'hosts': s.ALLOWED_HOSTS, "
            "'model': s.DEFAULT_BASE_MODEL}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["debug"] is False and loaded["finders"] is False
    assert (loaded["engine"], loaded["host"]) == ("django.db.backends.postgresql", "postgres")
    assert loaded["broker"] == "redis://redis:6379/0"
    assert loaded["hosts"] == env_example_values()["ALLOWED_HOSTS"].split(",")
    assert loaded["model"] == env_example_values()["DEFAULT_BASE_MODEL"]


# ---------------------------------------------------------------- Dockerfile and .dockerignore


def test_dockerfile_installs_the_pinned_cpu_torch_first_and_runs_as_a_user():
    text = (ROOT / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith(("#", " "))]
    assert instructions[0] == "FROM python:3.11-slim"
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in instructions
    torch_install = text.index('--index-url "$TORCH_INDEX_URL" torch==2.13.0')
    assert torch_install < text.index("--constraint constraints.txt")
    assert 'pip install --constraint constraints.txt --editable ".[postgres]"' in text
    assert "WORKDIR /app" in instructions
    assert "SPLITLEARN_DATA_DIR=/data" in text
    assert "collectstatic --noinput" in text
    assert 'chown -R app:app "$STATIC_ROOT"' in text, "web collects into the static volume at each start"
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert "EXPOSE 8000" in instructions
    # Reached directly, without nginx: no --proxy-headers (compose adds it).
    assert instructions[-1] == 'CMD ["daphne", "--bind", "0.0.0.0", "--port", "8000", "webapp.asgi:application"]'


def test_dockerignore_keeps_local_state_and_secrets_out_of_the_image():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "data", "test-artifacts", ".env", "**/__pycache__", ".pytest_cache"} <= ignored
    assert "deploy/nginx" in ignored, "nginx's files, TLS keys included, stay out of the application image"
    assert "!.env.example" in ignored


def test_gitignore_keeps_env_files_out_of_the_repository_but_not_the_example():
    git = shutil.which("git")
    assert git is not None and (ROOT / ".git").exists(), "the tests run in a git clone of the repository, with git"

    def ignored(path: str) -> bool:
        # --no-index: the rules themselves, whether or not the file is tracked.
        result = subprocess.run([git, "check-ignore", "--quiet", "--no-index", path], cwd=ROOT, capture_output=True,
                                text=True, timeout=30)
        assert result.returncode in (0, 1), result.stderr
        return result.returncode == 0

    assert ignored(".env") and ignored(".env.local") and ignored(".env.production")
    assert not ignored(".env.example")
    assert ignored("deploy/nginx/certs/privkey.pem") and ignored("deploy/nginx/certs/fullchain.pem")
    assert not ignored("deploy/nginx/certs/README.md")
