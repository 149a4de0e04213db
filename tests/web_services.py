"""Tests start the real processes through the project's own launchers, and send task messages to
a Redis of their own with ``sender_for_broker`` (routed to the queues the workers consume)."""

from webapp.celery import sender_for_broker
from webapp.processes import CeleryWorker, RedisServer, WebServer, start_redis, start_web_server, start_worker

__all__ = ["CeleryWorker", "RedisServer", "WebServer", "sender_for_broker", "start_redis", "start_web_server",
           "start_worker"]
