"""HTTP over a plain socket, for tests that control exactly what is sent and when (request bodies)."""

from __future__ import annotations

import socket

BOUNDARY = "splitlearn-test-boundary"


def multipart_body(size: int) -> bytes:
    """A well-formed multipart/form-data upload of ``size`` bytes in all (one file field)."""
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    return head + b"y" * (size - len(head) - len(tail)) + tail


def post_head(port: int, headers: str, path: str = "/api/datasets/") -> socket.socket:
    """A connection with a multipart POST's request line and headers sent, and none of its body."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}"
                  f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n").encode())
    return sock


def read_response(sock: socket.socket, timeout: float = 30) -> tuple[int, bytes]:
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
