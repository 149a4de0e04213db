"""nginx in front of a real daphne, as docker-compose.yml runs them, on loopback ports.

Debian's nginx runs the shipped configuration rendered as the image renders it (tests/nginx_render.py),
upstream the daphne started here with --proxy-headers, as compose's web service. DATASET_MAX_UPLOAD_MB=1
for both, so the limit is 2 MiB. What each request reached is read from the logs: daphne's access log
has a line for each request the application answered, nginx's error log says why it refused one.

Measured here: an upload that declares more than the limit gets nginx's 413 as soon as its headers are in,
before a byte of the body is sent; a chunked one is counted as it arrives and refused once past the limit;
neither reaches daphne. A body under the limit is read whole by nginx first (to a temporary file in its
client_body_temp_path), then sent on to daphne, which reads it whole again (tests/test_web_body_limit.py).
"""

from __future__ import annotations

import http.client
import json
import re
import select
import shutil
import ssl
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from nginx_render import render, start_nginx, write_self_signed_certificate
from polling import wait_until
from raw_http import multipart_body, post_head, read_response
from rest_framework.authtoken.models import Token
from web_services import start_web_server
from websockets.sync.client import connect

from webapp.body_limit import _too_large
from webapp.processes import free_port
from webapp.trunks.models import TrunkServer

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def proxied_daphne(service_env, web_dirs):
    server = start_web_server({**service_env, "DATASET_MAX_UPLOAD_MB": "1"}, web_dirs["logs"] / "behind-nginx.log",
                              behind_proxy=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def static_root(tmp_path_factory):
    """What collectstatic puts into the static volume, in small: one of the app's files."""
    root = tmp_path_factory.mktemp("static")
    shutil.copy(ROOT / "static" / "favicon.svg", root / "favicon.svg")
    return root


@pytest.fixture(scope="module")
def nginx(proxied_daphne, static_root, tmp_path_factory):
    port = free_port()
    config = render(tmp_path_factory.mktemp("nginx"), upstream=f"127.0.0.1:{proxied_daphne.port}",
                    static_root=static_root, http_port=port, max_upload_mb="1")
    assert config.env["SPLITLEARN_SERVERS"] == "http"
    server = start_nginx(config, port)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_nginx(proxied_daphne, static_root, tmp_path_factory):
    """The TLS variant: a certificate in the certificate directory. Yields the server and a client context."""
    root = tmp_path_factory.mktemp("nginx-tls")
    certificate = write_self_signed_certificate(root / "certs")
    http_port, https_port = free_port(), free_port()
    config = render(root, upstream=f"127.0.0.1:{proxied_daphne.port}", static_root=static_root,
                    http_port=http_port, https_port=https_port, max_upload_mb="1")
    assert config.env["SPLITLEARN_SERVERS"] == "https"
    server = start_nginx(config, https_port)
    yield server, http_port, ssl.create_default_context(cadata=certificate.decode())
    server.stop()


@pytest.fixture
def expected_refusal(settings) -> str:
    """The web app's own message for a body over the limit of unknown size: nginx answers the same."""
    settings.DATASET_MAX_UPLOAD_BYTES = 1024 * 1024
    return _too_large(None, LIMIT)


def probe_path() -> str:
    return f"/probe-{uuid.uuid4().hex}/"


def reached_daphne(daphne, nginx, path: str) -> bool:
    """Whether a request for ``path`` reached daphne, once every earlier request through nginx is in its log."""
    marker = probe_path()
    try:
        urllib.request.urlopen(f"{nginx.url}{marker}", timeout=30)
    except urllib.error.HTTPError as error:
        assert error.code == 404, error  # Django's answer for an unknown page: it went through
    wait_until(lambda: marker in daphne.log(), f"{marker} in daphne's access log")
    return path in daphne.log()


def test_an_upload_declared_over_the_limit_gets_nginx_413_before_its_body(proxied_daphne, nginx,
                                                                        expected_refusal):
    path = probe_path()
    declared = 50 * 1024 * 1024
    with post_head(nginx.port, f"Content-Length: {declared}\r\nAccept: application/json\r\n", path) as sock:
        status, body = read_response(sock)  # not one byte of the body was sent
    assert status == 413
    assert json.loads(body) == {"detail": expected_refusal}  # JSON, as the web app answers a client asking for it
    wait_until(lambda: f"client intended to send too large body: {declared} bytes" in nginx.error_log(),
               "nginx's reason in its error log")
    assert not reached_daphne(proxied_daphne, nginx, path)


@pytest.mark.parametrize("path,accept,wants_json", [
    ("/api/datasets/", "", True),  # an API path: JSON whatever it accepts
    ("/datasets/upload/", "Accept: application/json\r\n", True),
    ("/datasets/upload/", "Accept: text/html,application/json\r\n", False),
    ("/datasets/upload/", "", False),
])
def test_nginx_s_413_is_json_or_a_page_as_the_web_app_s_would_be(nginx, expected_refusal, path, accept, wants_json):
    with post_head(nginx.port, f"Content-Length: {50 * 1024 * 1024}\r\n{accept}", path) as sock:
        status, body = read_response(sock)
    assert status == 413
    if wants_json:
        assert json.loads(body) == {"detail": expected_refusal}
    else:
        assert "<h1>Upload too large (413)</h1>" in body.decode()


def test_a_chunked_upload_is_cut_off_at_the_limit_by_nginx(proxied_daphne, nginx, expected_refusal):
    path = probe_path()
    chunk = b"y" * 65536
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent = 0
    browser = "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    with post_head(nginx.port, f"Transfer-Encoding: chunked\r\n{browser}", path) as sock:
        try:
            while sent < 40 * LIMIT and not select.select([sock], [], [], 0)[0]:  # until nginx answers
                sock.sendall(framed)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # nginx closed while we were still sending: its answer is in the socket
        status, body = read_response(sock)
    assert status == 413
    page = body.decode()  # a browser gets the site's page, with the web app's words
    assert "<h1>Upload too large (413)</h1>" in page and 'href="/static/css/app.css"' in page
    assert f"<p>{expected_refusal[0].upper()}{expected_refusal[1:]}.</p>" in page
    assert sent < 40 * LIMIT, "nginx answered while the body was still coming"
    reason = re.compile(r"client intended to send too large chunked body: (\d+)\+(\d+) bytes")
    wait_until(lambda: reason.search(nginx.error_log()), "nginx's reason in its error log")
    counted, arriving = map(int, reason.search(nginx.error_log()).groups())
    assert counted <= LIMIT < counted + arriving, "refused at the chunk that passed the limit"
    assert not reached_daphne(proxied_daphne, nginx, path)


def test_an_upload_under_the_limit_is_buffered_by_nginx_then_reaches_the_app(proxied_daphne, nginx):
    body = multipart_body(1536 * 1024)
    with post_head(nginx.port, f"Content-Length: {len(body)}\r\n") as sock:
        sock.sendall(body)
        status, response = read_response(sock)
    assert status == 403, response  # the API wants a login: the body went all the way through
    assert "credentials" in json.loads(response)["detail"].lower()
    temp = nginx.config.root / "temp" / "client_body"
    assert f"a client request body is buffered to a temporary file {temp}/" in nginx.error_log()
    wait_until(lambda: '"POST /api/datasets/" 403' in proxied_daphne.log(), "the upload in daphne's access log")


def test_pages_pass_through_and_static_files_come_from_nginx(proxied_daphne, nginx, static_root):
    with urllib.request.urlopen(f"{nginx.url}/accounts/login/", timeout=30) as page:
        assert page.status == 200 and page.headers["X-Frame-Options"] == "DENY"  # Django's
        assert b'name="csrfmiddlewaretoken"' in page.read()
    with urllib.request.urlopen(f"{nginx.url}/static/favicon.svg", timeout=30) as icon:
        assert icon.read() == (static_root / "favicon.svg").read_bytes()
        assert icon.headers["Content-Type"] == "image/svg+xml"
        assert icon.headers["Cache-Control"] == "max-age=60"
    assert not reached_daphne(proxied_daphne, nginx, "/static/favicon.svg")


def test_forged_forwarding_headers_are_replaced(proxied_daphne, nginx, owner):
    for name in ("a", "b"):
        TrunkServer.objects.create(name=name, address=f"{name}:50051", token="t" * 24)
    request = urllib.request.Request(f"{nginx.url}/api/trunks/?limit=1", headers={
        "Authorization": f"Token {Token.objects.create(user=owner).key}",
        "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"})
    with urllib.request.urlopen(request, timeout=30) as response:
        next_page = json.loads(response.read())["next"]
    assert next_page == f"http://127.0.0.1:{nginx.port}/api/trunks/?limit=1&offset=1"  # the scheme nginx saw
    # The client address daphne logs is nginx's X-Forwarded-For (with no port), not the forged one.
    wait_until(lambda: '"GET /api/trunks/?limit=1"' in proxied_daphne.log(), "the request in daphne's access log")
    line = next(line for line in proxied_daphne.log().splitlines() if '"GET /api/trunks/?limit=1"' in line)
    assert line.startswith("127.0.0.1:0 ") and "203.0.113.9" not in proxied_daphne.log()


def test_a_websocket_passes_through(proxied_daphne, nginx, client, django_user_model):
    staff = django_user_model.objects.create_user("staff", password="staff-pass-123", is_staff=True)
    client.force_login(staff)
    cookie = f"sessionid={client.cookies['sessionid'].value}"
    with connect(f"ws://127.0.0.1:{nginx.port}/ws/fleet/", open_timeout=30,
                 additional_headers={"Cookie": cookie, "Origin": nginx.url}) as socket_:
        assert socket_.response.status_code == 101
        snapshot = json.loads(socket_.recv(timeout=30))
    assert snapshot["type"] == "fleet" and "rows" in snapshot
    wait_until(lambda: "WSCONNECT /ws/fleet/" in proxied_daphne.log(), "the socket in daphne's log")


def test_with_a_certificate_nginx_serves_https_and_redirects_http(proxied_daphne, tls_nginx, owner, client,
                                                                 django_user_model):
    server, http_port, context = tls_nginx
    https = f"https://127.0.0.1:{server.port}"
    plain = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
    plain.request("GET", "/jobs/?page=2", headers={"Host": f"127.0.0.1:{http_port}"})
    redirect = plain.getresponse()
    assert (redirect.status, redirect.getheader("Location")) == (301, f"{https}/jobs/?page=2")
    plain.close()
    # Django sees the scheme nginx terminated: absolute links are https ones.
    for name in ("a", "b"):
        TrunkServer.objects.create(name=name, address=f"{name}:50051", token="t" * 24)
    request = urllib.request.Request(f"{https}/api/trunks/?limit=1",
                                     headers={"Authorization": f"Token {Token.objects.create(user=owner).key}"})
    with urllib.request.urlopen(request, timeout=30, context=context) as response:
        assert json.loads(response.read())["next"] == f"{https}/api/trunks/?limit=1&offset=1"
    # And the live pages' sockets over TLS.
    staff = django_user_model.objects.create_user("staff", password="staff-pass-123", is_staff=True)
    client.force_login(staff)
    with connect(f"wss://127.0.0.1:{server.port}/ws/fleet/", ssl=context, open_timeout=30,
                 additional_headers={"Cookie": f"sessionid={client.cookies['sessionid'].value}",
                                     "Origin": https}) as socket_:
        assert json.loads(socket_.recv(timeout=30))["type"] == "fleet"
