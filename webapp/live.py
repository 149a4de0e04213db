"""What every WebSocket consumer shares: refusing anonymous users, one group, forwarding events.

Consumers only authenticate, authorise and forward. Refusals close with 4401 (not logged
in) or 4404 (no such object of this user). Clients only listen; what they send is ignored.
Publishers send ``{"type": "<kind>.event", "event": {...}}``; the consumer's matching
handler (``job_event``, ``generation_event``) forwards ``event`` as JSON.

Open sockets are counted per route (each consumer's ``metrics_route``) for ``/metrics``. The
count lives in this process: honest because the web app is one daphne process; with several,
each would count only its own sockets and Prometheus would have to scrape each.
"""

from __future__ import annotations

from channels.generic.websocket import AsyncJsonWebsocketConsumer
from prometheus_client import Gauge

NOT_AUTHENTICATED = 4401
NOT_FOUND = 4404

# Registered on the /metrics registry (metrics.py), not on prometheus_client's global one.
OPEN_SOCKETS = Gauge("splitlearn_websocket_connections", "WebSockets open in this web process, per route.",
                     ["route"], registry=None)


class ListeningConsumer(AsyncJsonWebsocketConsumer):
    group: str | None = None
    metrics_route = "unnamed"  # each consumer names its route: the label of its sockets in OPEN_SOCKETS
    counted = False  # whether this socket was accepted, and so counted until it disconnects

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "metrics_route" in vars(cls):
            OPEN_SOCKETS.labels(cls.metrics_route)  # shown (as 0) before the route's first socket

    async def accept(self, subprotocol=None, headers=None) -> None:
        await super().accept(subprotocol, headers)
        if not self.counted:
            self.counted = True
            OPEN_SOCKETS.labels(self.metrics_route).inc()

    async def websocket_disconnect(self, message) -> None:
        # Here rather than in disconnect(), which a consumer may override without calling super().
        if self.counted:
            self.counted = False
            OPEN_SOCKETS.labels(self.metrics_route).dec()
        await super().websocket_disconnect(message)

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
