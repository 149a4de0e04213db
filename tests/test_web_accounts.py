"""Log in / log out, sign-up behind its setting, and settings that fail loudly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import PROJECT_ROOT

from webapp.env import ImproperlyConfiguredEnv, env_bool, env_int

pytestmark = pytest.mark.django_db


def test_login_and_logout(client, django_user_model):
    django_user_model.objects.create_user("ada", password="a-long-password-1")
    assert client.get("/jobs/").status_code == 302
    page = client.post("/accounts/login/", {"username": "ada", "password": "wrong"})
    assert page.status_code == 200 and "Please enter a correct username and password" in page.content.decode()
    response = client.post("/accounts/login/", {"username": "ada", "password": "a-long-password-1"})
    assert response.status_code == 302 and response["Location"] == "/jobs/"
    assert client.get("/jobs/").status_code == 200
    assert client.post("/accounts/logout/").status_code == 302
    assert client.get("/jobs/").status_code == 302


def test_sign_up_is_off_by_default(client, django_user_model):
    assert client.get("/accounts/signup/").status_code == 404
    client.post("/accounts/signup/", {"username": "eve", "password1": "x-Very-long-pass-9", "password2":
                                      "x-Very-long-pass-9"})
    assert not django_user_model.objects.filter(username="eve").exists()
    assert "Sign up" not in client.get("/accounts/login/").content.decode()


def test_sign_up_when_enabled(client, django_user_model, settings):
    settings.SIGNUP_ENABLED = True
    assert "Sign up" in client.get("/accounts/login/").content.decode()
    response = client.post("/accounts/signup/", {"username": "bob", "password1": "x-Very-long-pass-9",
                                                 "password2": "x-Very-long-pass-9"})
    assert response.status_code == 302
    assert django_user_model.objects.filter(username="bob").exists()
    assert client.get("/jobs/").status_code == 200, "signed up and logged in"


def test_login_form_is_csrf_protected(django_user_model):
    from django.test import Client

    django_user_model.objects.create_user("ada", password="a-long-password-1")
    strict = Client(enforce_csrf_checks=True)
    assert strict.post("/accounts/login/", {"username": "ada", "password": "a-long-password-1"}).status_code == 403


def test_env_helpers_fail_loudly(monkeypatch):
    monkeypatch.setenv("FLAG", "maybe")
    with pytest.raises(ImproperlyConfiguredEnv, match="FLAG='maybe' is not a boolean"):
        env_bool("FLAG", False)
    monkeypatch.setenv("COUNT", "ten")
    with pytest.raises(ImproperlyConfiguredEnv, match="COUNT='ten' is not an integer"):
        env_int("COUNT", 1)
    monkeypatch.setenv("COUNT", "0")
    with pytest.raises(ImproperlyConfiguredEnv, match="out of range"):
        env_int("COUNT", 1, minimum=1)


def test_secret_key_is_required_outside_debug(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", "DEBUG", "SECRET_KEY_FILE")}
    env["SPLITLEARN_DATA_DIR"] = str(tmp_path)
    command = [sys.executable, "-c", "import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', "
               "'webapp.settings'); django.setup()"]
    result = subprocess.run(command, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "SECRET_KEY (or SECRET_KEY_FILE) must be set when DEBUG is off" in result.stderr
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file-0123456789abcdefghijklmnopqrstuvwxyz")
    result = subprocess.run(command, env={**env, "SECRET_KEY_FILE": str(key_file)}, cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    result = subprocess.run(command, env={**env, "DEBUG": "1"}, cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "secret_key").stat().st_mode & 0o077 == 0, "the generated key is private to its owner"
