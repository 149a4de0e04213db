"""WebSocket routes of every app."""

from django.urls import path

from .playground import consumers as playground_consumers
from .training import consumers
from .trunks import consumers as trunk_consumers

websocket_urlpatterns = [
    path("ws/jobs/", consumers.JobListConsumer.as_asgi()),
    path("ws/jobs/<int:job_id>/", consumers.JobConsumer.as_asgi()),
    path("ws/generations/<int:generation_id>/", playground_consumers.GenerationConsumer.as_asgi()),
    path("ws/fleet/", trunk_consumers.FleetConsumer.as_asgi()),
]
