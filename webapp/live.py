"""What every WebSocket consumer shares: refusing anonymous users, one group, forwarding events.

Consumers only authenticate, authorise and forward. Refusals close with 4401 (not logged
in) or 4404 (no such object of this user). Clients only listen; what they send is ignored.
Publishers send ``{"type": "<kind>.event", "event": {...}}``; the consumer's matching
handler (``job_event``, ``generation_event``) forwards ``event`` as JSON.
"""

from __future__ import annotations

from channels.generic.websocket import AsyncJsonWebsocketConsumer

NOT_AUTHENTICATED = 4401
NOT_FOUND = 4404


class ListeningConsumer(AsyncJsonWebsocketConsumer):
    group: str | None = None

    async def logged_in_user(self):
        """The session's user, or None after closing the socket with 4401."""
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=NOT_AUTHENTICATED)
            return None
        return user

    async def join(self, group: str) -> None:
        self.group = group
        await self.channel_layer.group_add(group, self.channel_name)

    async def disconnect(self, code: int) -> None:
        if self.group is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content, **kwargs) -> None:
        """Clients only listen."""

    async def forward(self, message: dict) -> None:
        await self.send_json(message["event"])
