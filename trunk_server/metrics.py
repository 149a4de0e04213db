"""Prometheus metrics of one trunk server at ``/metrics`` on their own port (``--metrics-port``).

One collector reads everything at scrape time: the counters (``stats.py``), the sessions and
the host's memory, so no figure is updated by hand twice. Each server has its own
``CollectorRegistry`` (several servers may run in one process, e.g. in tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector

from splitcore import __version__

from .host import TrunkHost
from .sessions import SessionRegistry
from .stats import ENDINGS, MODES, TOKEN_KINDS

PREFIX = "splitlearn_trunk_"


class TrunkCollector(Collector):
    def __init__(self, host: TrunkHost, sessions: SessionRegistry) -> None:
        self.host = host
        self.sessions = sessions

    def collect(self):
        host, sessions = self.host, self.sessions
        active = sessions.active_count()  # expires stale sessions first, as Info does
        stats = host.stats.snapshot()
        yield InfoMetricFamily(PREFIX.rstrip("_"), "What this trunk serves", value={
            "model_id": host.model_id, "version": __version__, "device": str(host.device),
            "dtype": str(host.dtype).removeprefix("torch.")})
        yield GaugeMetricFamily(f"{PREFIX}uptime_seconds", "Seconds since the server started serving",
                                value=stats.uptime_s)
        yield GaugeMetricFamily(f"{PREFIX}sessions_active", "Sessions open now", value=active)
        yield GaugeMetricFamily(f"{PREFIX}sessions_max", "Sessions this trunk holds at most",
                                value=sessions.max_sessions)
        opened = CounterMetricFamily(f"{PREFIX}sessions_opened", "Sessions opened, by mode", labels=["mode"])
        for mode in MODES:
            opened.add_metric([mode], stats.sessions_opened[mode])
        yield opened
        ended = CounterMetricFamily(f"{PREFIX}sessions_closed", "Sessions ended: closed (by their client or at "
                                    "shutdown) or expired (their lease ran out)", labels=["how"])
        for how in ENDINGS:
            ended.add_metric([how], stats.sessions_ended[how])
        yield ended
        requests = CounterMetricFamily(f"{PREFIX}requests", "RPCs answered, by RPC and gRPC status code",
                                       labels=["rpc", "code"])
        for (rpc, code), count in sorted(stats.requests.items()):
            requests.add_metric([rpc, code], count)
        yield requests
        latency = HistogramMetricFamily(f"{PREFIX}request_duration_seconds", "Seconds from request to answer, by RPC",
                                        labels=["rpc"])
        for rpc, histogram in sorted(stats.latencies.items()):
            latency.add_metric([rpc], histogram.cumulative(), sum_value=histogram.total_s)
        yield latency
        tokens = CounterMetricFamily(f"{PREFIX}tokens_processed",
                                     "Rows x positions of hidden states the trunk ran forward, by kind",
                                     labels=["kind"])
        for kind in TOKEN_KINDS:
            tokens.add_metric([kind], stats.tokens[kind])
        yield tokens
        yield CounterMetricFamily(f"{PREFIX}busy_seconds",
                                  "Seconds the trunk's blocks spent computing (forward, backward, optimizer)",
                                  value=stats.busy_s)
        memory = GaugeMetricFamily(f"{PREFIX}memory_bytes",
                                   "Memory of the compute device: its total, the base weights, the open sessions",
                                   labels=["kind"])
        memory.add_metric(["total"], host.memory_total())
        memory.add_metric(["base"], host.base_bytes)
        memory.add_metric(["sessions"], host.memory_beyond_base(sessions.sessions_bytes()))
        yield memory


@dataclass
class MetricsServer:
    server: WSGIServer
    host: str

    @property
    def port(self) -> int:
        return self.server.server_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(address: str, port: int, host: TrunkHost, sessions: SessionRegistry) -> MetricsServer:
    """Serve ``/metrics`` on ``address:port`` (0: a free port) from a thread; OSError when it cannot bind."""
    registry = CollectorRegistry()
    registry.register(TrunkCollector(host, sessions))
    ProcessCollector(registry=registry)  # process_* : CPU seconds, resident memory, open files
    server, _thread = start_http_server(port, addr=address, registry=registry)
    return MetricsServer(server=server, host=address)
