"""Refuse a request body over MAX_REQUEST_BYTES (HTTP 413) before Django reads it: the second line.

The first line is nginx (docker-compose.yml, deploy/nginx/): its ``client_max_body_size`` is the same
limit, so it answers 413 as soon as a declared ``Content-Length`` over it is in, and cuts a chunked body
off at the limit; neither reaches the application. Without nginx (``make run``) daphne is alone, and it
reads a request's whole body before calling the application (Twisted spools it to a temporary file,
parses a multipart one itself and daphne queues all of it at once), with no limit of its own
(tests/test_web_body_limit.py measures this). What this middleware still spares is Django's own work:
Django's ASGI handler copies a whole body into a file before any view runs, and parses it. A declared
``Content-Length`` over the limit is refused before Django reads any of it; a chunked body is counted
as Django reads it and refused the moment it passes the limit.
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
