"""What refuses a request body over the limit, and when, with daphne alone (as under `make run`).

The server here runs with DATASET_MAX_UPLOAD_MB=1, so MAX_REQUEST_BYTES is 2 MiB.

daphne has no size limit of its own and reads a request's whole body before the application sees any of
it (Twisted's HTTP server): a declared body under 100,000 bytes in memory, a larger or chunked one into an
anonymous temporary file in TMPDIR (measured below through /proc). A multipart/form-data body is then
parsed by Twisted itself, in memory (a malformed one gets 400 without reaching the application), and daphne
queues the whole body for the application at once, in 8 kB messages. Only then does webapp/body_limit.py,
the second line, see the request: a declared Content-Length over the limit is answered 413 before Django
reads any of the queued body; a chunked body is counted as Django reads it and refused (413) once it passes
the limit. So under `make run` an oversized upload is transferred, written to disk and held in memory whole
before its 413; the middleware spares only Django's own copy and parsing.

In docker-compose.yml nginx answers first: 413 as soon as a declared size over the limit is in, a chunked
body cut off at the limit, neither reaching daphne (tests/test_nginx_proxy.py).
"""

from __future__ import annotations

import json
import os
import select
import socket
import urllib.request
from pathlib import Path

import pytest
from polling import wait_until
from raw_http import multipart_body, post_head, read_response
from web_services import start_web_server

from webapp.datasets.models import Dataset

pytestmark = pytest.mark.django_db(transaction=True)

LIMIT = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def spool_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("daphne-tmp")


@pytest.fixture(scope="module")
def small_limit_server(service_env, web_dirs, spool_dir):
    server = start_web_server({**service_env, "DATASET_MAX_UPLOAD_MB": "1", "TMPDIR": str(spool_dir)},
                              web_dirs["logs"] / "body-limit.log")
    yield server
    server.stop()


def answered(sock: socket.socket) -> bool:
    """Whether the server has sent anything (or closed) on this connection yet."""
    return bool(select.select([sock], [], [], 0)[0])


def spooled(server, directory: Path) -> list[int]:
    """Sizes of the files in ``directory`` the server process holds open, deleted ones included."""
    sizes = []
    for fd in Path(f"/proc/{server.process.pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith(f"{directory}/"):
                sizes.append(fd.stat().st_size)
        except OSError:
            continue  # closed meanwhile
    return sizes


def still_serving(server) -> bool:
    return urllib.request.urlopen(f"{server.url}/accounts/login/", timeout=30).status == 200


def test_daphne_spools_a_declared_oversized_body_to_disk_before_the_middleware_refuses_it(small_limit_server,
                                                                                           spool_dir):
    datasets = Dataset.objects.count()
    body = multipart_body(LIMIT + 1024 * 1024)  # 3 MiB, declared
    half = len(body) // 2
    with post_head(small_limit_server.port, f"Content-Length: {len(body)}\r\n") as sock:
        sock.sendall(body[:half])
        # daphne keeps reading into an anonymous temporary file in its TMPDIR, and answers nothing yet. It
        # writes through a buffered file object: the last few kB sent may still sit in that buffer.
        wait_until(lambda: half - 65536 <= sum(spooled(small_limit_server, spool_dir)) <= half,
                   "half the body spooled to TMPDIR", observed=lambda: (half, spooled(small_limit_server, spool_dir)))
        assert len(spooled(small_limit_server, spool_dir)) == 1
        assert not answered(sock), "nothing is refused before the whole body is in"
        sock.sendall(body[half:])
        status, response = read_response(sock)
    assert status == 413
    assert json.loads(response)["detail"].startswith(
        "the request body is 3 MiB; the limit is 2 MiB (datasets up to 1 MiB)")
    wait_until(lambda: spooled(small_limit_server, spool_dir) == [], "the temporary file closed (and so gone)")
    assert Dataset.objects.count() == datasets
    assert still_serving(small_limit_server)


def test_a_chunked_body_is_read_whole_then_cut_off_at_the_limit_by_the_middleware(small_limit_server, spool_dir):
    body = multipart_body(LIMIT + 512 * 1024)
    chunks = [body[start:start + 65536] for start in range(0, len(body), 65536)]
    with post_head(small_limit_server.port, "Transfer-Encoding: chunked\r\n") as sock:
        for chunk in chunks:
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        # Past the limit and still reading: the decoder may hold back the end of the last chunk.
        wait_until(lambda: sum(spooled(small_limit_server, spool_dir)) > LIMIT, "the body spooled past the limit",
                   observed=lambda: spooled(small_limit_server, spool_dir))
        assert not answered(sock), "the end of a chunked body is its last chunk: nothing is refused before it"
        sock.sendall(b"0\r\n\r\n")
        status, response = read_response(sock)
    assert status == 413
    assert json.loads(response)["detail"].startswith("the request body is larger; the limit is 2 MiB")
    assert still_serving(small_limit_server)


def test_a_malformed_multipart_body_is_refused_by_daphne_before_the_application(small_limit_server):
    with post_head(small_limit_server.port, "Content-Length: 5000\r\n", path="/malformed-probe/") as sock:
        sock.sendall(b"z" * 5000)
        status, body = read_response(sock)
    assert (status, body) == (400, b"")  # Twisted's bare answer; Django's would say why
    # daphne logs each request the application answered; a later one shows the log has caught up.
    urllib.request.urlopen(f"{small_limit_server.url}/accounts/login/?after-malformed-probe", timeout=30).close()
    log = small_limit_server.log_path
    wait_until(lambda: log.read_text().count('"GET /accounts/login/"') > 0, "a later request in the access log")
    assert "/malformed-probe/" not in log.read_text()


def test_an_invalid_content_length_is_a_bad_request(small_limit_server):
    with post_head(small_limit_server.port, "Content-Length: 12abc\r\n") as sock:
        try:
            status, body = read_response(sock)
        except ConnectionResetError:
            pytest.fail("the server dropped the connection instead of answering")
    assert status == 400, body  # the HTTP parser refuses it before the application sees it
    assert still_serving(small_limit_server)


def test_a_body_under_the_limit_reaches_the_application(small_limit_server):
    # 1.5 MB passes the request limit; the dataset service then refuses it with its own message.
    body = multipart_body(1536 * 1024)
    with post_head(small_limit_server.port, f"Content-Length: {len(body)}\r\n") as sock:
        sock.sendall(body)
        status, response = read_response(sock, timeout=30)
    assert status == 403, response  # it got as far as the API, which wants a login
    assert "credentials" in json.loads(response)["detail"].lower()
