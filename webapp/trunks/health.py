"""Trunk health checks: the standard gRPC health service, then ``Info``, recorded on the row.

A check is two steps. ``probe`` only talks to the network (no database, never raises), so
many trunks can be probed at once from threads; ``record`` writes the outcome in the
calling thread. ``check_trunk`` does both for one trunk, ``check_trunks`` for several.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

import grpc
from django.conf import settings
from django.db import DatabaseError
from django.utils import timezone
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitcore.remote.client import RetryPolicy
from splitcore.remote.errors import TrunkError
from splitcore.remote.proto import trunk_pb2 as pb

from .models import BUDGET_FIELDS, HealthSample, TrunkServer

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
# Probes are network waits, not CPU work: this many run at once in ``check_trunks``.
MAX_PARALLEL_PROBES = 8

# Info fields copied as they are (strings are cut to the column's length; "" is blank: not reported).
_INFO_FIELDS = ("model_id", "model_type", "weights_fingerprint", "num_layers", "trunk_start", "trunk_end",
                "min_trunk_start", "max_trunk_end", "hidden_size", "max_sessions", "active_sessions", "version",
                "device", "dtype")
# Info fields a trunk from before them leaves at 0: stored as NULL, "not reported".
_REPORTED_IF_SET = ("memory_total_bytes", "memory_base_bytes", *BUDGET_FIELDS)
# The trunk's counters since it started (0 from a trunk from before them: stored as NULL).
_COUNTERS = ("uptime_s", "tokens_processed", "busy_s", "sessions_opened")
# Every field a check writes; ``save(update_fields=...)`` leaves the admin's fields alone.
HEALTH_FIELDS = ("status", "latency_ms", *_INFO_FIELDS, *_REPORTED_IF_SET, "memory_sessions_bytes", "last_error",
                 "last_checked_at")


@dataclass(frozen=True)
class ProbeResult:
    """What one check learned: the trunk's Info and the Info round trip, or why it failed."""

    info: pb.InfoResponse | None = None
    latency_ms: float | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.info is not None


class _CheckFailed(Exception):
    pass


def probe(trunk: TrunkServer, timeout_s: float = DEFAULT_TIMEOUT_S) -> ProbeResult:
    """Health ``Check`` (service ""), then ``Info``; any failure becomes an actionable message.

    Reads only the trunk's connection settings (no database access), so it is safe in a thread.
    """
    try:
        client = trunk.client(timeout_s=timeout_s, retry=RetryPolicy(attempts=1))
    except Exception as error:  # e.g. a malformed address or CA certificate
        return ProbeResult(error=_scrub(f"cannot open a channel to {trunk.address}: {error}", trunk.token))
    try:
        # On the client's own channel: the same TLS settings as every other call, and the connection
        # the health call opens makes the timed Info a round trip rather than a handshake.
        _check_serving(client.channel, trunk, timeout_s)
        started = time.perf_counter()
        try:
            info = client.info()
        except TrunkError as error:
            raise _CheckFailed(_describe(error, trunk, timeout_s, "Info")) from None
        latency_ms = (time.perf_counter() - started) * 1000.0
        return ProbeResult(info=info, latency_ms=latency_ms)
    except _CheckFailed as failure:
        return ProbeResult(error=_scrub(str(failure), trunk.token))
    except Exception as error:
        log.exception("unexpected failure while checking trunk %s", trunk.name)
        return ProbeResult(error=_scrub(f"the check failed unexpectedly: {type(error).__name__}: {error}",
                                        trunk.token))
    finally:
        client.close()


def record(trunk: TrunkServer, result: ProbeResult) -> TrunkServer:
    """Write a probe's outcome on the row (health fields only) and as a health sample; return the trunk."""
    trunk.last_checked_at = timezone.now()
    if result.ok:
        info = result.info
        for field in _INFO_FIELDS:
            value = getattr(info, field)
            max_length = TrunkServer._meta.get_field(field).max_length
            setattr(trunk, field, value[:max_length] if max_length else value)
        for field in _REPORTED_IF_SET:
            setattr(trunk, field, getattr(info, field) or None)
        # Idle sessions take no memory: 0 is a figure whenever the trunk reports its memory at all.
        trunk.memory_sessions_bytes = info.memory_sessions_bytes if info.memory_total_bytes else None
        trunk.status = TrunkServer.Status.UP
        trunk.latency_ms = result.latency_ms
        trunk.last_error = ""
    else:
        # The Info fields keep their last known values: they say what the trunk was serving.
        trunk.status = TrunkServer.Status.DOWN
        trunk.latency_ms = None
        trunk.last_error = result.error
    trunk.save(update_fields=HEALTH_FIELDS)
    _store_sample(trunk, result)
    return trunk


def _store_sample(trunk: TrunkServer, result: ProbeResult) -> None:
    """One sample per check (the fleet page's charts); those past the retention go."""
    info = result.info if result.ok else None
    counted = info is not None and info.uptime_s > 0
    HealthSample.objects.create(
        trunk=trunk, checked_at=trunk.last_checked_at, up=result.ok, latency_ms=result.latency_ms,
        active_sessions=info.active_sessions if info else None, max_sessions=info.max_sessions if info else None,
        memory_sessions_bytes=trunk.memory_sessions_bytes if info else None,
        **{name: getattr(info, name) if counted else None for name in _COUNTERS})
    cutoff = trunk.last_checked_at - timedelta(seconds=settings.TRUNK_HEALTH_RETENTION_S)
    HealthSample.objects.filter(checked_at__lt=cutoff).delete()


def check_trunk(trunk: TrunkServer, timeout_s: float = DEFAULT_TIMEOUT_S) -> TrunkServer:
    """Check one trunk now and record the result (status, Info fields, latency, last error)."""
    return record(trunk, probe(trunk, timeout_s))


def check_trunks(trunks: Iterable[TrunkServer], timeout_s: float = DEFAULT_TIMEOUT_S) -> list[TrunkServer]:
    """Probe several trunks at once (one slow trunk does not delay the others), then record each.

    Returns the trunks whose result was recorded; one that cannot be (deleted meanwhile, a
    database hiccup) is logged and left out, and the others are still recorded.
    """
    trunks = list(trunks)
    if not trunks:
        return []
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_PROBES, len(trunks)),
                            thread_name_prefix="trunk-probe") as pool:
        results = list(pool.map(lambda trunk: probe(trunk, timeout_s), trunks))
    recorded = []
    for trunk, result in zip(trunks, results):
        try:
            recorded.append(record(trunk, result))
        except DatabaseError:
            log.warning("could not record the check of trunk %s (deleted meanwhile?)", trunk.name, exc_info=True)
    return recorded


# ------------------------------------------------------------------ internals


def _check_serving(channel: grpc.Channel, trunk: TrunkServer, timeout_s: float) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
    except grpc.RpcError as error:
        raise _CheckFailed(_describe(TrunkError.from_rpc(error, retried=True), trunk, timeout_s, "health")) from None
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        raise _CheckFailed(f"health service reports {status}: the trunk server at {trunk.address} is starting "
                           f"or shutting down; check again in a moment")


def _describe(error: TrunkError, trunk: TrunkServer, timeout_s: float, call: str) -> str:
    """A failed check in an admin's words: the connection hints a check can give, else the error's own."""
    code = error.code
    if code == grpc.StatusCode.UNAVAILABLE:
        tls = "on" if trunk.use_tls else "off"
        return (f"cannot reach {trunk.address} ({code.name}: {error.details}); is the trunk server running there, "
                f"and does it use TLS (TLS is {tls} here)?")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return (f"no answer from {trunk.address} within {timeout_s:g} s ({code.name}); "
                f"the trunk is overloaded or a firewall drops the traffic")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        what = "the gRPC health service" if call == "health" else "the trunk service"
        return f"{trunk.address} does not offer {what} ({code.name}); is this address a trunk server?"
    return f"{call} call: {error.explain(f'the trunk server at {trunk.address}')}"


def _scrub(message: str, token: str) -> str:
    """Messages end up in the admin and the API: the token must never be part of one."""
    return message.replace(token, "<token>") if token else message
