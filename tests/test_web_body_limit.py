"""Request bodies over the limit are refused (413) before they are read, over a real socket.

The web server here runs with DATASET_MAX_UPLOAD_MB=1, so MAX_REQUEST_BYTES is 2 MiB.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request

import pytest
from web_services import start_web_server

from webapp.datasets.models import Dataset

pytestmark = pytest.mark.django_db(transaction=True)

LIMIT = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def small_limit_server(service_env, web_dirs):
    server = start_web_server({**service_env, "DATASET_MAX_UPLOAD_MB": "1"}, web_dirs["logs"] / "body-limit.log")
    yield server
    server.stop()


def read_response(sock: socket.socket, timeout: float = 10) -> tuple[int, bytes]:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def request_head(server, headers: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall((f"POST /api/datasets/ HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}"
                  "Content-Type: multipart/form-data; boundary=x\r\n\r\n").encode())
    return sock


def still_serving(server) -> bool:
    return urllib.request.urlopen(f"{server.url}/accounts/login/", timeout=30).status == 200


def test_a_declared_size_over_the_limit_is_refused_before_a_byte_of_the_body(small_limit_server):
    datasets = Dataset.objects.count()
    with request_head(small_limit_server, f"Content-Length: {50 * 1024 * 1024}\r\n") as sock:
        started = time.monotonic()
        status, body = read_response(sock)  # not one byte of the 50 MB body was sent
        assert status == 413
        assert json.loads(body)["detail"].startswith("the request body is 50.0 MB; the limit is 2.0 MB (datasets up to 1.0 MB)")
        assert time.monotonic() - started < 10
    assert Dataset.objects.count() == datasets
    assert still_serving(small_limit_server)


def test_a_chunked_body_is_cut_off_at_the_limit(small_limit_server):
    chunk = b"y" * 65536
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent = 0
    with request_head(small_limit_server, "Transfer-Encoding: chunked\r\n") as sock:
        try:
            while sent < 40 * LIMIT:  # keep sending until the server stops reading and answers
                sock.sendall(framed)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass
        status, body = read_response(sock)
    assert status == 413
    assert json.loads(body)["detail"].startswith("the request body is larger; the limit is 2.0 MB")
    # The server stopped reading at the limit: what was sent beyond it sits in socket buffers at most.
    assert sent < 40 * LIMIT
    assert still_serving(small_limit_server)


def test_an_invalid_content_length_is_a_bad_request(small_limit_server):
    with request_head(small_limit_server, "Content-Length: 12abc\r\n") as sock:
        try:
            status, body = read_response(sock)
        except ConnectionResetError:
            pytest.fail("the server dropped the connection instead of answering")
    assert status == 400, body  # the HTTP parser refuses it before the application sees it
    assert still_serving(small_limit_server)


def test_a_body_under_the_limit_reaches_the_application(small_limit_server):
    # 1.5 MB passes the request limit; the dataset service then refuses it with its own message.
    with request_head(small_limit_server, f"Content-Length: {1536 * 1024}\r\n") as sock:
        sock.sendall(b"z" * (1536 * 1024))
        status, body = read_response(sock, timeout=30)
    assert status == 403, body  # it got as far as the API, which wants a login
    assert "credentials" in json.loads(body)["detail"].lower()
