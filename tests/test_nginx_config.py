"""deploy/nginx, rendered as the nginx image renders it (tests/nginx_render.py), passes ``nginx -t``.

Debian's nginx checks it (1.22; the image runs 1.30): the config keeps to directives both have. The
upstream here is the one compose gives, ``web:8000``, which does not resolve on this machine: nginx looks
it up per request, so the config is valid before the web container exists.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
from nginx_render import ENTRYPOINT_SCRIPT, TEMPLATES, entrypoint_environment, render, write_self_signed_certificate

COMPOSE_UPSTREAM = "web:8000"


@pytest.fixture
def static_root(tmp_path):
    path = tmp_path / "static"
    path.mkdir()
    return path


def assert_valid(config) -> None:
    result = config.test()
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr and "test is successful" in result.stderr
    for path in config.conf_d.rglob("*"):
        if path.is_file():
            assert "${" not in path.read_text(), f"{path.name}: a template variable was left unset"


def test_the_http_config_passes_nginx_t(tmp_path, static_root):
    config = render(tmp_path / "nginx", upstream=COMPOSE_UPSTREAM, static_root=static_root, http_port=8080)
    assert config.env["SPLITLEARN_SERVERS"] == "http"
    assert_valid(config)
    default = (config.conf_d / "default.conf").read_text()
    assert "include conf.d/splitlearn/http.servers;" in default
    assert "set $splitlearn_web web:8000;" in (config.conf_d / "splitlearn" / "app.locations").read_text()


def test_the_tls_config_passes_nginx_t_once_a_certificate_is_mounted(tmp_path, static_root):
    write_self_signed_certificate(tmp_path / "nginx" / "certs")
    config = render(tmp_path / "nginx", upstream=COMPOSE_UPSTREAM, static_root=static_root, http_port=8080,
                    https_port=8443)
    assert config.env["SPLITLEARN_SERVERS"] == "https"
    assert_valid(config)
    servers = (config.conf_d / "splitlearn" / "https.servers").read_text()
    assert "return 301 https://$host:8443$request_uri;" in servers
    assert f"ssl_certificate {tmp_path / 'nginx' / 'certs' / 'fullchain.pem'};" in servers


def test_a_certificate_without_its_key_is_refused(tmp_path, static_root):
    certs = tmp_path / "nginx" / "certs"
    write_self_signed_certificate(certs)
    (certs / "privkey.pem").unlink()
    with pytest.raises(RuntimeError, match="TLS needs both .*fullchain.pem and .*privkey.pem; only one is there"):
        render(tmp_path / "nginx", upstream=COMPOSE_UPSTREAM, static_root=static_root, http_port=8080)


def fresh_settings():
    """webapp/settings.py run again in this environment, beside the settings Django already holds."""
    spec = importlib.util.find_spec("webapp.settings")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("upload_mb", ["1", "50", "0200"])
def test_the_body_limit_is_the_web_apps_max_request_bytes(tmp_path, static_root, monkeypatch, upload_mb):
    """One setting, DATASET_MAX_UPLOAD_MB, gives nginx's client_max_body_size and Django's MAX_REQUEST_BYTES."""
    config = render(tmp_path / "nginx", upstream=COMPOSE_UPSTREAM, static_root=static_root, http_port=8080,
                    max_upload_mb=upload_mb)
    monkeypatch.setenv("DATASET_MAX_UPLOAD_MB", upload_mb)
    django_limit = fresh_settings().MAX_REQUEST_BYTES
    assert django_limit == (int(upload_mb) + 1) * 1024 * 1024
    locations = (config.conf_d / "splitlearn" / "app.locations").read_text()
    assert f"client_max_body_size {django_limit};" in locations
    assert_valid(config)


def entrypoint_env(upload_mb: str) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "DATASET_MAX_UPLOAD_MB": upload_mb, "SPLITLEARN_WEB_UPSTREAM": "web:8000",
            "SPLITLEARN_STATIC_ROOT": "/srv/static", "NGINX_LOCAL_RESOLVERS": "127.0.0.11"}


@pytest.mark.parametrize("upload_mb", ["abc", "12.5", "0", "-3"])
def test_a_bad_upload_limit_stops_nginx_and_names_the_setting(upload_mb):
    result = entrypoint_environment(entrypoint_env(upload_mb))
    assert result.returncode != 0
    assert b"DATASET_MAX_UPLOAD_MB must be" in result.stderr


def test_an_empty_upload_limit_is_the_default_as_in_the_settings():
    result = entrypoint_environment(entrypoint_env(""))
    assert result.returncode == 0, result.stderr
    assert b"\0SPLITLEARN_MAX_REQUEST_BYTES=53477376\0" in b"\0" + result.stdout  # (50 + 1) MiB


def test_the_image_finds_the_templates_and_runs_the_script():
    # 20-envsubst-on-templates.sh renders *.template under /etc/nginx/templates; default.conf replaces the
    # image's own default server. The entrypoint sources *.envsh files only when they are executable,
    # and in sort -V order: after 15-local-resolvers.envsh, before 20-envsubst-on-templates.sh.
    assert (TEMPLATES / "default.conf.template").is_file()
    assert {path.name for path in (TEMPLATES / "splitlearn").iterdir()} == {
        "app.locations.template", "http.servers.template", "https.servers.template"}
    assert os.access(ENTRYPOINT_SCRIPT, os.X_OK)
    assert ENTRYPOINT_SCRIPT.suffix == ".envsh"  # sourced: what it exports reaches the templates
    assert "15-local-resolvers.envsh" < ENTRYPOINT_SCRIPT.name < "20-envsubst-on-templates.sh"
