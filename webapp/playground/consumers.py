"""``/ws/generations/<id>/``: one generation's text as it is written, for its owner only.

On connect: the group is joined first, then the row is read and sent as a ``snapshot``
(status, the text so far and the tokens it covers), then live ``status``/``token``/``done``
events are forwarded (see events.py). A consumer handles one message at a time, so no event
reaches the page before its snapshot; events stored before the snapshot was read and sent
after it are recognised by their token count. Refusals close with 4401 (not logged in) or 4404 (no such generation of
this user), like the job consumers.
"""

from __future__ import annotations

from channels.db import database_sync_to_async

from ..live import NOT_FOUND, ListeningConsumer
from . import events
from .models import Generation


class GenerationConsumer(ListeningConsumer):
    metrics_route = "generation"
    generation_event = ListeningConsumer.forward

    async def connect(self) -> None:
        user = await self.logged_in_user()
        if user is None:
            return
        self.generation_id = self.scope["url_route"]["kwargs"]["generation_id"]
        if not await self._owns(user):
            await self.close(code=NOT_FOUND)
            return
        await self.join(events.generation_group(self.generation_id))
        snapshot = await self._snapshot()
        if snapshot is None:  # deleted in between
            await self.channel_layer.group_discard(self.group, self.channel_name)
            await self.close(code=NOT_FOUND)
            return
        await self.accept()
        await self.send_json(snapshot)

    @database_sync_to_async
    def _owns(self, user) -> bool:
        return Generation.objects.filter(pk=self.generation_id, owner=user).exists()

    @database_sync_to_async
    def _snapshot(self) -> dict | None:
        generation = Generation.objects.filter(pk=self.generation_id).first()
        return events.snapshot_event(generation) if generation is not None else None
