"""Tests start the real processes through the project's own launchers."""

from webapp.processes import CeleryWorker, RedisServer, WebServer, start_redis, start_web_server, start_worker

__all__ = ["CeleryWorker", "RedisServer", "WebServer", "start_redis", "start_web_server", "start_worker"]
