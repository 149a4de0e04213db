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

The refusal is the site's 413 page (templates/413.html) for a browser, JSON with a ``detail`` for an API
client (webapp/error_pages.py decides which); sizes are in binary units (MiB), as the limit is set.
"""

from __future__ import annotations

import json

from django.conf import settings
from django.template.loader import render_to_string

from .byte_sizes import format_bytes
from .error_pages import wants_json


class BodySizeLimit:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = settings.MAX_REQUEST_BYTES
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and int(declared) > limit:  # the HTTP parser already refused a malformed one
            return await _refuse(scope, send, _too_large(int(declared), limit))

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
            await _refuse(scope, send, _too_large(None, limit))


def _too_large(size: int | None, limit: int) -> str:
    what = f"the request body is {format_bytes(size)}" if size is not None else "the request body is larger"
    return (f"{what}; the limit is {format_bytes(limit)} (datasets up to "
            f"{format_bytes(settings.DATASET_MAX_UPLOAD_BYTES)}). Split the dataset or ask an administrator to "
            "raise DATASET_MAX_UPLOAD_MB")


async def _refuse(scope, send, message: str) -> None:
    """413 Content Too Large, with the reason (a page or JSON), and the connection closed."""
    headers = dict(scope.get("headers") or [])
    if wants_json(scope.get("path", ""), headers.get(b"accept", b"").decode("latin-1")):
        body, content_type = json.dumps({"detail": message}).encode(), b"application/json"
    else:
        # No request: the page needs no session, user or database (the layout shows no navigation).
        body = render_to_string("413.html", {
            "detail": message[0].upper() + message[1:],
            "dataset_limit": format_bytes(settings.DATASET_MAX_UPLOAD_BYTES)}).encode()
        content_type = b"text/html; charset=utf-8"
    await send({"type": "http.response.start", "status": 413, "headers": [
        (b"content-type", content_type), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
