"""``create_server``: the one place where the gRPC server's options are set."""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from splitcore.remote.proto import trunk_pb2_grpc as pb_grpc

from .auth import BearerTokenInterceptor
from .config import TrunkServerConfig
from .host import TrunkHost
from .metrics import MetricsServer, serve_metrics
from .request_parsing import RequestParsingInterceptor
from .servicer import TrunkServicer
from .sessions import SessionRegistry

SERVICE_NAME = "splitlearn.trunk.v1.Trunk"


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    registry: SessionRegistry
    _sweeper_stop: threading.Event
    metrics: MetricsServer | None = None  # None: no metrics endpoint

    def stop(self, grace_s: float = 5.0) -> None:
        """Report NOT_SERVING, finish in-flight RPCs (up to ``grace_s``), drop every session."""
        self.health.enter_graceful_shutdown()
        self._sweeper_stop.set()
        self.server.stop(grace_s).wait()
        self.registry.close_all()
        if self.metrics is not None:
            self.metrics.stop()


def create_server(config: TrunkServerConfig, host: TrunkHost) -> RunningServer:
    registry = SessionRegistry(host, config.max_sessions, config.session_lease_s, config.budgets)
    count = host.stats.request_done  # calls refused before the servicer are counted too
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.worker_threads, thread_name_prefix="trunk-rpc"),
        # Authenticate first; then parse requests in the handler, so junk answers INVALID_ARGUMENT.
        interceptors=[BearerTokenInterceptor(config.token, count),
                      RequestParsingInterceptor(f"/{SERVICE_NAME}/", count)],
        options=[
            # One message is at most this big; larger tensors arrive as chunked streams.
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            # Notice dead clients on idle connections without flooding live ones.
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 30_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.so_reuseport", 0),
        ],
        # Beyond this many RPCs in flight, new calls get RESOURCE_EXHAUSTED instead of queueing.
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
    )
    pb_grpc.add_TrunkServicer_to_server(TrunkServicer(config, host, registry), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{config.host}:{config.port}"
    if config.tls_cert is not None:
        credentials = grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    metrics = None
    if config.metrics_port is not None:
        try:
            metrics = serve_metrics(config.metrics_host, config.metrics_port, host, registry)
        except OSError as exc:
            server.stop(None)
            raise OSError(f"could not serve metrics on {config.metrics_host}:{config.metrics_port}: {exc}") from exc
    server.start()
    host.stats.mark_started()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    stop = threading.Event()

    def sweep() -> None:
        interval = max(0.5, min(30.0, config.session_lease_s / 4))
        while not stop.wait(interval):
            registry.expire()

    threading.Thread(target=sweep, name="session-sweeper", daemon=True).start()
    return RunningServer(server=server, port=port, health=health_servicer, registry=registry, _sweeper_stop=stop,
                         metrics=metrics)
