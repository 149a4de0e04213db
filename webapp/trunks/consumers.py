"""``/ws/fleet/``: the fleet page's live rows, for staff only (4401 when not logged in, 4404 for
anyone else, as if there were no such socket). On connect: a snapshot; then each new one."""

from __future__ import annotations

from channels.db import database_sync_to_async

from ..live import NOT_FOUND, ListeningConsumer
from . import fleet


class FleetConsumer(ListeningConsumer):
    fleet_event = ListeningConsumer.forward
    metrics_route = "fleet"

    async def connect(self) -> None:
        user = await self.logged_in_user()
        if user is None:
            return
        if not (user.is_active and user.is_staff):
            await self.close(code=NOT_FOUND)
            return
        await self.join(fleet.FLEET_GROUP)
        await self.accept()
        await self.send_json(await database_sync_to_async(fleet.snapshot)())
