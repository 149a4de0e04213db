"""Refuse a request body over the limit before reading it (HTTP 413).

Django's ASGI handler reads a whole body into a file before any view runs, so a view or a
Django setting can only refuse an upload after it arrived. This ASGI middleware sits in
front: a declared ``Content-Length`` over ``MAX_REQUEST_BYTES`` is refused as soon as the
headers are in, without reading a byte of the body; a chunked body is counted as it arrives
and refused the moment it passes the limit. The ASGI server (uvicorn) reads from the socket
only as the application asks, so the rest of an oversized upload is never read.
"""

from __future__ import annotations

import json

from django.conf import settings


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB"


class BodySizeLimit:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = settings.MAX_REQUEST_BYTES
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and int(declared) > limit:  # the HTTP parser already refused a malformed one
            return await _refuse(send, _too_large(int(declared), limit))

        received = 0
        exceeded = False
        started = False

        async def counted_receive():
            nonlocal received, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    return {"type": "http.disconnect"}  # Django stops reading and answers nothing
            return message

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, counted_receive, tracked_send)
        if exceeded and not started:
            await _refuse(send, _too_large(None, limit))


def _too_large(size: int | None, limit: int) -> str:
    what = f"the request body is {_megabytes(size)}" if size is not None else "the request body is larger"
    return (f"{what}; the limit is {_megabytes(limit)} (datasets up to "
            f"{_megabytes(settings.DATASET_MAX_UPLOAD_BYTES)}). Split the dataset or ask an administrator to "
            "raise DATASET_MAX_UPLOAD_MB")


async def _refuse(send, message: str) -> None:
    """413 Content Too Large, with the reason as JSON, and the connection closed."""
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": 413, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
