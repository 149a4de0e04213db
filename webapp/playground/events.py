"""Live events of one generation, sent to its channel-layer group ``generation-<id>``.

Every event is a JSON object with a ``type``:

- ``snapshot`` (from the consumer on connect): status, the text so far with the number of tokens
  it covers (``token_count``), error_message, stop_requested;
- ``status``: the worker took the generation (status ``running``), or its owner asked to stop it
  (``stop_requested``);
- ``token``: new text: ``{"type": "token", "text": delta, "offset": n, "token_count": c,
  "previous_count": p}``; the text covering ``p`` tokens becomes its first ``n`` characters followed
  by ``delta``, and covers ``c`` tokens (``n`` is nearly always the current length: it is smaller
  only when decoding one more token changed text already sent);
- ``done``: the end: status, the whole text, error_message and token_count.

The worker stores the text and its token count before it sends a token event, and the
consumer joins the group before it reads the row, then sends the snapshot before any event
(a consumer handles one message at a time). So a snapshot plus the events after it hold all
text, once: a token event whose ``token_count`` the snapshot already covers is skipped, and one
whose ``previous_count`` is not the page's count means an event was lost (the page then asks
for a new snapshot). The token events of a generation, applied in order, end at its stored
output. A publish that fails (Redis away) costs a live update, never the output: it is in
the database.
"""

from __future__ import annotations

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from .models import Generation

log = logging.getLogger(__name__)


def generation_group(generation_id: int) -> str:
    return f"generation-{generation_id}"


def snapshot_event(generation: Generation) -> dict:
    return {"type": "snapshot", "generation": generation.pk, "status": generation.status,
            "text": generation.output, "error_message": generation.error_message,
            "token_count": generation.token_count, "stop_requested": generation.stop_requested}


def status_event(generation: Generation) -> dict:
    return {"type": "status", "generation": generation.pk, "status": generation.status,
            "stop_requested": generation.stop_requested}


def token_event(delta: str, offset: int, token_count: int, previous_count: int) -> dict:
    return {"type": "token", "text": delta, "offset": offset, "token_count": token_count,
            "previous_count": previous_count}


def done_event(generation: Generation) -> dict:
    return {"type": "done", "generation": generation.pk, "status": generation.status, "text": generation.output,
            "error_message": generation.error_message, "token_count": generation.token_count}


def publish(generation_id: int, event: dict) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    group = generation_group(generation_id)
    try:
        async_to_sync(layer.group_send)(group, {"type": "generation.event", "event": event})
    except Exception as exc:  # noqa: BLE001 - a live update is not worth a failed generation
        log.warning("could not publish a %s event to %s: %s", event.get("type"), group, exc)
