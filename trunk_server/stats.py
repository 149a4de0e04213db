"""Counters since the server started, kept in one thread-safe object.

Info reports them and the Prometheus endpoint (``metrics.py``) reads them at scrape time.
Sessions, the host and the servicer feed them; nothing here touches tensors or data.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

# What a session is opened as, and how it ended.
MODES = ("training", "inference")
ENDINGS = ("closed", "expired")
# What the trunk ran forward: a training Forward, a validation Forward, an inference (KV-cache) Forward.
TOKEN_KINDS = ("training", "evaluation", "inference")
# Upper bounds (seconds) of the request latency histogram: 1 ms to 60 s.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Latencies:
    """One RPC's latency histogram: counts per bucket of ``LATENCY_BUCKETS_S`` (the last one: above)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    total_s: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.total_s += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, observations at or below it) per bucket, ending with "+Inf"."""
        bounds = [repr(float(bound)) for bound in LATENCY_BUCKETS_S] + ["+Inf"]
        running, buckets = 0, []
        for bound, count in zip(bounds, self.counts):
            running += count
            buckets.append((bound, running))
        return buckets


@dataclass(frozen=True)
class StatsSnapshot:
    uptime_s: float
    busy_s: float
    sessions_opened: dict[str, int]  # by mode
    sessions_ended: dict[str, int]  # by ending: closed, expired
    tokens: dict[str, int]  # by kind
    requests: dict[tuple[str, str], int]  # (rpc, status code name) -> calls
    latencies: dict[str, Latencies]  # by rpc (copies)


class TrunkStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._busy_s = 0.0
        self._opened: Counter[str] = Counter()
        self._ended: Counter[str] = Counter()
        self._tokens: Counter[str] = Counter()
        self._requests: Counter[tuple[str, str]] = Counter()
        self._latencies: dict[str, Latencies] = {}

    def mark_started(self) -> None:
        """Uptime counts from now (the server starts serving after the model has loaded)."""
        with self._lock:
            self._started = time.monotonic()

    def session_opened(self, mode: str) -> None:
        with self._lock:
            self._opened[mode] += 1

    def session_ended(self, how: str) -> None:
        with self._lock:
            self._ended[how] += 1

    def add_tokens(self, kind: str, count: int) -> None:
        with self._lock:
            self._tokens[kind] += count

    def add_busy(self, seconds: float) -> None:
        with self._lock:
            self._busy_s += seconds

    def request_done(self, rpc: str, code: str, seconds: float) -> None:
        """One RPC answered with the status ``code`` (a name such as "OK" or "NOT_FOUND")."""
        with self._lock:
            self._requests[(rpc, code)] += 1
            self._latencies.setdefault(rpc, Latencies()).observe(seconds)

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            return StatsSnapshot(
                uptime_s=time.monotonic() - self._started, busy_s=self._busy_s,
                sessions_opened={mode: self._opened[mode] for mode in MODES},
                sessions_ended={how: self._ended[how] for how in ENDINGS},
                tokens={kind: self._tokens[kind] for kind in TOKEN_KINDS},
                requests=dict(self._requests),
                latencies={rpc: Latencies(list(h.counts), h.total_s) for rpc, h in self._latencies.items()},
            )
