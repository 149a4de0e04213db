"""Django settings: every value from the environment (see ``.env.example`` and the README)."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from splitcore.model.devices import CLIENT_DTYPES, DEVICE_NAME, DEVICES

from .env import env_bool, env_float, env_int, env_list, env_match, env_path, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = env_path("SPLITLEARN_DATA_DIR", BASE_DIR / "data")
DATA_DIR.mkdir(parents=True, exist_ok=True)  # the SQLite database and generated files live here

DEBUG = env_bool("DEBUG", False)


# The key `make run` generates for this data directory (webapp/launcher.py, Launcher.secret_key_file).
# Commands run beside it (`manage.py drf_create_token admin`) read it; only the launcher writes it.
LAUNCHER_SECRET_KEY_FILE = DATA_DIR / "run" / "secret_key"


def _secret_key() -> str:
    key = env_str("SECRET_KEY")
    if key:
        return key
    if LAUNCHER_SECRET_KEY_FILE.is_file():
        key = LAUNCHER_SECRET_KEY_FILE.read_text().strip()
        if key:
            return key
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY (or SECRET_KEY_FILE) must be set when DEBUG is off; "
                                   f"`make run` generates one in {LAUNCHER_SECRET_KEY_FILE}, which is read when "
                                   "present")
    # Development: one generated key, kept in the data directory so restarts keep sessions.
    path = DATA_DIR / "secret_key"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(50))
    return path.read_text().strip()


SECRET_KEY = _secret_key()
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost"] + (["testserver"] if DEBUG else []))
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
CSRF_FAILURE_VIEW = "webapp.error_pages.csrf_failure"  # the site's page, or JSON for API clients
# No SECURE_PROXY_SSL_HEADER: behind nginx (docker-compose.yml) daphne runs with --proxy-headers and hands
# Django the scheme and client address nginx saw (X-Forwarded-Proto and -For, which nginx sets itself);
# reached directly (`make run`), it trusts no such header from clients.

INSTALLED_APPS = [
    # First: its runserver command replaces Django's, so `manage.py runserver` serves ASGI_APPLICATION
    # (HTTP and WebSockets) with daphne, the server of `make run` and the Docker image.
    "daphne",
    "channels",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "webapp.accounts",
    "webapp.datasets",
    "webapp.trunks",
    "webapp.training",
    "webapp.playground",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Static files from the app server itself: no CDN and no separate web server needed.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "webapp.urls"
WSGI_APPLICATION = "webapp.wsgi.application"
ASGI_APPLICATION = "webapp.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "webapp.accounts.context.signup",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        # Persistent connections are not safe under ASGI: one connection per request.
        env_str("DATABASE_URL") or f"sqlite:///{DATA_DIR / 'db.sqlite3'}", conn_max_age=0
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Web and worker processes write at once: wait for the lock, and let readers through (WAL).
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"]["OPTIONS"] = {"timeout": 30, "init_command": "PRAGMA journal_mode=WAL;",
                                       "transaction_mode": "IMMEDIATE"}
    # A file, not memory, so that a Celery worker process sees the test database.
    DATABASES["default"]["TEST"] = {"NAME": env_str("TEST_DATABASE_PATH") or str(DATA_DIR / "test-db.sqlite3")}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "training:job-list"
LOGOUT_REDIRECT_URL = "login"
# Log-in throttling (webapp/accounts/throttle.py, counted in CACHES): this many failed log-ins for one
# username, or from one client address, within LOGIN_LOCKOUT_S seconds of the first, and further log-ins
# are refused (429) until that window ends.
LOGIN_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 5, minimum=1)
LOGIN_FAILURE_IP_LIMIT = env_int("LOGIN_FAILURE_IP_LIMIT", 20, minimum=1)
LOGIN_LOCKOUT_S = env_int("LOGIN_LOCKOUT_S", 900, minimum=1)

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = env_path("STATIC_ROOT", DATA_DIR / "staticfiles")
# Without `collectstatic`, serve straight from static/ (the embedded setup does not collect).
WHITENOISE_USE_FINDERS = env_bool("WHITENOISE_USE_FINDERS", True)
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # whitenoise expects it even when it serves from static/
MEDIA_ROOT = env_path("MEDIA_ROOT", DATA_DIR / "media")
MEDIA_URL = "media/"  # never served directly: downloads go through views that check the owner

SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", not DEBUG and bool(CSRF_TRUSTED_ORIGINS))
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
X_FRAME_OPTIONS = "DENY"

# ---------------------------------------------------------------- the product's own settings

SIGNUP_ENABLED = env_bool("SIGNUP_ENABLED", False)
DATASET_MAX_UPLOAD_BYTES = env_int("DATASET_MAX_UPLOAD_MB", 50, minimum=1) * 1024 * 1024
# Any request body over this is refused (413): a dataset plus its form. nginx (compose) refuses it by its
# Content-Length before reading it; daphne alone (make run) receives it first and webapp/body_limit.py
# refuses it before Django reads it (README, Security notes).
MAX_REQUEST_BYTES = DATASET_MAX_UPLOAD_BYTES + 1024 * 1024
# Per-user limits (0: no limit): stored datasets, and jobs queued or running at once.
MAX_DATASETS_PER_USER = env_int("MAX_DATASETS_PER_USER", 100, minimum=0)
MAX_ACTIVE_JOBS_PER_USER = env_int("MAX_ACTIVE_JOBS_PER_USER", 3, minimum=0)
# What one user may store, in MiB (0: no limit): datasets, and each job's checkpoints, adapter and merged model.
# An upload that would pass it is refused; a user past it starts no new job until something is deleted.
USER_STORAGE_QUOTA_MB = env_int("USER_STORAGE_QUOTA_MB", 10240, minimum=0)
# The most optimizer steps one job may run, whether set as max steps or reached by epochs over its dataset.
MAX_JOB_STEPS = env_int("MAX_JOB_STEPS", 100_000, minimum=1)
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
DATA_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
# Base models the workers can load (Bottom and Top run there): MODELS_DIR/<model id>/.
MODELS_DIR = env_path("SPLITLEARN_MODELS_DIR", DATA_DIR / "models")
JOBS_DIR = env_path("SPLITLEARN_JOBS_DIR", DATA_DIR / "jobs")
DEFAULT_BASE_MODEL = env_str("DEFAULT_BASE_MODEL", "SmolLM2-135M-Instruct")
TRUNK_HEALTH_INTERVAL_S = env_float("TRUNK_HEALTH_INTERVAL_S", 30.0, minimum=1.0)
# Each check stores a health sample (the fleet page's charts show the last hour); older ones are deleted.
TRUNK_HEALTH_RETENTION_S = env_float("TRUNK_HEALTH_RETENTION_S", 86400.0, minimum=3600.0)
TRUNK_RPC_TIMEOUT_S = env_float("TRUNK_RPC_TIMEOUT_S", 120.0, minimum=1.0)
# A job whose trunk cannot be reached waits this long (retrying) before it fails.
TRUNK_WAIT_S = env_float("TRUNK_WAIT_S", 60.0, minimum=0.0)
JOB_CHECKPOINT_EVERY = env_int("JOB_CHECKPOINT_EVERY", 25, minimum=1)
# Where a worker computes its parts of a model (the Bottom and Top of jobs and generations).
WORKER_DEVICE = env_match("WORKER_DEVICE", "cpu", DEVICE_NAME, DEVICES)
# The dtype of the frozen Bottom and Top weights a worker holds (fp32 or bf16); adapters and optimizer stay fp32.
WORKER_DTYPE = env_match("WORKER_DTYPE", "fp32", re.compile(f"^({'|'.join(CLIENT_DTYPES)})$"),
                         " or ".join(CLIENT_DTYPES))
# Frozen weights a worker process keeps loaded for its jobs, generations and audits (shared among them,
# least recently used out past this many GB; what a running job uses stays until it ends).
WORKER_MODEL_CACHE_GB = env_float("WORKER_MODEL_CACHE_GB", 8.0, minimum=0.0)
# A running job's worker renews its lease every JOB_HEARTBEAT_S; a job whose lease is older
# than JOB_STALE_AFTER_S (its worker died) is queued again by the sweep beat runs every
# JOB_SWEEP_S, and continues from its last checkpoint. The sweep also re-sends queued jobs
# whose message may have been lost (a Redis restart) after JOB_REDISPATCH_S.
JOB_HEARTBEAT_S = env_float("JOB_HEARTBEAT_S", 10.0, minimum=0.1)
JOB_STALE_AFTER_S = env_float("JOB_STALE_AFTER_S", 90.0, minimum=1.0)
JOB_SWEEP_S = env_float("JOB_SWEEP_S", 30.0, minimum=0.5)
JOB_REDISPATCH_S = env_float("JOB_REDISPATCH_S", 300.0, minimum=1.0)
# A trunk lost mid-job (crash, restart) is waited for and the job continues from its last
# checkpoint; after this many losses without progress in between, the job fails.
JOB_TRUNK_RECOVERIES = env_int("JOB_TRUNK_RECOVERIES", 3, minimum=0)
# A playground generation stops after this long (keeping its text so far); one still running
# JOB_STALE_AFTER_S after that lost its worker, and the sweep ends it as failed.
GENERATION_TIMEOUT_S = env_float("GENERATION_TIMEOUT_S", 600.0, minimum=1.0)
# A merged-model build (base + adapter in one model, zipped) stops after this long; one still building
# JOB_STALE_AFTER_S after that (or never started by a worker) lost its worker, and the sweep fails it.
MERGED_BUILD_TIMEOUT_S = env_float("MERGED_BUILD_TIMEOUT_S", 3600.0, minimum=10.0)
# A built merged model is kept this many hours after its build, then deleted (a model-sized zip per job
# adds up); asked for again, it is built again.
MERGED_RETENTION_HOURS = env_float("MERGED_RETENTION_HOURS", 72.0, minimum=0.01)
# The leakage audit a worker runs on each job: examples of the job's data it attacks (0: no audit).
PRIVACY_AUDIT_SAMPLE = env_int("PRIVACY_AUDIT_SAMPLE", 8, minimum=0)
# Whether that audit also runs its strong attacks (an inversion network trained on more public text): on 2 CPU
# cores the default model's audit takes 25 s instead of 8 s at cut 2 + 2, so off unless the workers have the time.
PRIVACY_AUDIT_STRONG = env_bool("PRIVACY_AUDIT_STRONG", False)
# The most of a step's compute (splitcore.model.compute_share) the setting the job form recommends may run on
# this site's workers: a cut that keeps most of the model here defeats the point of lending a trunk.
PRIVACY_MAX_CLIENT_SHARE = env_float("PRIVACY_MAX_CLIENT_SHARE", 0.35)
if not 0 < PRIVACY_MAX_CLIENT_SHARE <= 1:
    raise ImproperlyConfigured(f"PRIVACY_MAX_CLIENT_SHARE={PRIVACY_MAX_CLIENT_SHARE} must be a share of a step above "
                               "0 and at most 1 (e.g. 0.35)")
if JOB_STALE_AFTER_S <= 2 * JOB_HEARTBEAT_S:
    raise ImproperlyConfigured(f"JOB_STALE_AFTER_S ({JOB_STALE_AFTER_S}) must be more than twice "
                               f"JOB_HEARTBEAT_S ({JOB_HEARTBEAT_S}), or live jobs would be taken as dead")

# ---------------------------------------------------------------- Celery (Redis broker)

REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL)
CELERY_RESULT_BACKEND = None
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Training tasks run for hours; a message is redelivered only when its worker is gone.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT_S", 43200, minimum=60)}
# One queue per kind of work, each consumed by its own workers: health checks, sweeps and
# playground generations never wait behind hours-long training jobs. Everything not routed
# here (beat's tasks, any new small task) goes to the control queue.
TRAINING_QUEUE = "training"
GENERATION_QUEUE = "generation"
MERGE_QUEUE = "merge"
CONTROL_QUEUE = "control"
# not CELERY_*: Celery would read it as a setting
ALL_QUEUES = (TRAINING_QUEUE, GENERATION_QUEUE, MERGE_QUEUE, CONTROL_QUEUE)
CELERY_TASK_DEFAULT_QUEUE = CONTROL_QUEUE
CELERY_TASK_ROUTES = {
    "training.run_job": {"queue": TRAINING_QUEUE},
    "playground.generate": {"queue": GENERATION_QUEUE},
    # Reads and rewrites a whole model, shard by shard, for seconds to an hour: on a queue of its own, so
    # neither the control queue's checks nor the playground's answers wait behind a build.
    "training.build_merged_model": {"queue": MERGE_QUEUE},
}
CELERY_BEAT_SCHEDULE = {
    "check-trunks": {"task": "trunks.check_all", "schedule": TRUNK_HEALTH_INTERVAL_S},
    "recover-jobs": {"task": "training.recover_jobs", "schedule": JOB_SWEEP_S},
    "recover-generations": {"task": "playground.recover_generations", "schedule": JOB_SWEEP_S},
    "expire-merged": {"task": "training.expire_merged", "schedule": JOB_SWEEP_S},
}

# ---------------------------------------------------------------- Channels (live pages)

# Each WebSocket consumer waits for its next message in a blocking Redis read of up to 5 s
# (channels_redis's BZPOPMIN), and redis-py's default socket timeout is 5 s too: an idle page's
# read would time out about as often as not, killing its consumer and dropping the socket. Reads
# get a timeout well past the blocking wait; a dead Redis is still noticed within it.
CHANNEL_LAYER_SOCKET_TIMEOUT_S = 30.0


def channel_layer_host(url: str) -> dict:
    """One Redis of the channel layer, as channels_redis takes it (also used by the tests)."""
    return {"address": url, "socket_timeout": CHANNEL_LAYER_SOCKET_TIMEOUT_S, "socket_connect_timeout": 5.0,
            "socket_keepalive": True}


CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [channel_layer_host(env_str("CHANNEL_LAYER_URL") or REDIS_URL)], "capacity": 1000,
                   "expiry": 60},
    }
}

# ---------------------------------------------------------------- Cache (Redis)

# Shared by every web process, so that log-in throttling holds across them. Short socket timeouts:
# with Redis unreachable a log-in waits seconds at most, and the throttle lets it through. The
# database is Celery's broker too: never call cache.clear(), it would empty the queues.
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "splitlearn",
        "OPTIONS": {"socket_connect_timeout": 2.0, "socket_timeout": 2.0},
    }
}

# ---------------------------------------------------------------- REST API

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
        "rest_framework.authentication.TokenAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer",
                                 "rest_framework.renderers.BrowsableAPIRenderer"],
    "DEFAULT_PAGINATION_CLASS": "webapp.pagination.CappedLimitOffsetPagination",
    "PAGE_SIZE": 100,
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
}
