"""`manage.py` beside `make run`: with nothing exported, the settings read the Django key the launcher
generated for the same data directory, so `manage.py drf_create_token admin` works as the README says."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from contextlib import closing
from dataclasses import replace

from conftest import PROJECT_ROOT

from webapp.launcher import Launcher, LauncherConfig, _secret

CREATE_ADMIN = ("from pathlib import Path; from django.conf import settings; "
                "from django.contrib.auth import get_user_model; from django.core.management import call_command; "
                "call_command('migrate', verbosity=0); get_user_model().objects.create_superuser('admin', '', None); "
                "print('same key:', settings.SECRET_KEY == Path({key!r}).read_text().strip())")


def manage(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "manage.py", *args], cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_drf_create_token_works_on_the_data_directory_of_make_run(tmp_path):
    unset = ("SECRET_KEY", "SECRET_KEY_FILE", "DEBUG", "DATABASE_URL")
    env = {**{k: v for k, v in os.environ.items() if k not in unset}, "SPLITLEARN_DATA_DIR": str(tmp_path)}
    launcher = Launcher(replace(LauncherConfig.from_env(), data_dir=tmp_path))

    refused = manage("drf_create_token", "admin", env=env)
    assert refused.returncode != 0 and "must be set when DEBUG is off" in refused.stderr
    assert str(launcher.secret_key_file) in refused.stderr, "the error says where `make run` keeps its key"
    assert not launcher.secret_key_file.exists(), "the settings never create the launcher's key"

    _secret(launcher.secret_key_file)  # what `make run` does first (Launcher.prepare)
    setup = manage("shell", "-c", CREATE_ADMIN.format(key=str(launcher.secret_key_file)), env=env)
    assert setup.returncode == 0 and "same key: True" in setup.stdout, setup.stderr

    created = manage("drf_create_token", "admin", env=env)
    assert created.returncode == 0, created.stderr
    token = re.fullmatch(r"Generated token ([0-9a-f]{40}) for user admin\n", created.stdout).group(1)
    with closing(sqlite3.connect(tmp_path / "db.sqlite3")) as db:
        assert db.execute("SELECT key FROM authtoken_token").fetchall() == [(token,)]
