"""What a trunk error means, decided once for the server, the client, the web runners and the health check.

The server answers every refusal with a gRPC status code and a *reason* in the trailing
metadata (``splitlearn-reason``): the code says what kind of failure it is, the reason says
exactly which one, so a client never reads meaning out of a message's words. Clients turn
(code, reason) into a ``Fault``: what to do about it.
"""

from __future__ import annotations

import enum

import grpc

REASON_KEY = "splitlearn-reason"


class Reason(str, enum.Enum):
    """Why the server refused a call; each one has its status code in ``STATUS``."""

    SESSION_GONE = "session-gone"  # unknown session: closed, its lease ran out, or the server restarted
    FULL = "full"  # every session slot is taken
    OUT_OF_MEMORY = "out-of-memory"  # the device ran out of memory for this request (what it took is freed)
    BUDGET = "budget"  # the request is beyond one of the session's budgets
    LAYERS_REFUSED = "layers-refused"  # the layer range is outside the operator's bounds
    ACTIVATIONS_GONE = "activations-gone"  # Backward without saved activations: resend the Forward inputs
    STEP_CONFLICT = "step-conflict"  # a step already applied, or a call out of order
    DEADLINE_PASSED = "deadline-passed"  # the caller's deadline passed while the call waited for the model
    BAD_REQUEST = "bad-request"  # malformed or invalid


STATUS = {
    Reason.SESSION_GONE: grpc.StatusCode.NOT_FOUND,
    Reason.FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.OUT_OF_MEMORY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.BUDGET: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.LAYERS_REFUSED: grpc.StatusCode.OUT_OF_RANGE,
    Reason.ACTIVATIONS_GONE: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.STEP_CONFLICT: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.DEADLINE_PASSED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Reason.BAD_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
}


class TrunkRefusal(Exception):
    """Raised on the server for a request it refuses; ``reason`` picks the status code."""

    reason = Reason.BAD_REQUEST


class SessionGone(TrunkRefusal, LookupError):
    reason = Reason.SESSION_GONE


class TrunkFull(TrunkRefusal):
    reason = Reason.FULL


class OutOfMemory(TrunkRefusal):
    reason = Reason.OUT_OF_MEMORY


class BudgetExceeded(TrunkRefusal):
    reason = Reason.BUDGET


class LayersRefused(TrunkRefusal, ValueError):
    reason = Reason.LAYERS_REFUSED


class ActivationsGone(TrunkRefusal):
    reason = Reason.ACTIVATIONS_GONE


class StepConflict(TrunkRefusal, ValueError):
    reason = Reason.STEP_CONFLICT


class DeadlinePassed(TrunkRefusal):
    reason = Reason.DEADLINE_PASSED


class Fault(enum.Enum):
    """What a client does about an error."""

    RETRYABLE = "retryable"  # the trunk did not answer (yet): try the same call again
    LOST = "lost"  # still no answer after the retries: the trunk is down or unreachable
    SESSION_GONE = "session gone"  # open a new session (and restore its state)
    FULL = "full"  # no room now (sessions or memory): wait, or use another trunk
    UNAUTHENTICATED = "unauthenticated"  # the token is wrong: an administrator must fix it
    ACTIVATIONS_GONE = "activations gone"  # resend the Forward inputs with the Backward
    BAD_REQUEST = "bad request"  # this request will not work here as it is (settings, budgets, versions)


_RETRYABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def reason_of(trailing_metadata) -> Reason | None:
    for key, value in trailing_metadata or ():
        if key == REASON_KEY:
            try:
                return Reason(value)
            except ValueError:
                return None  # a newer server's reason: fall back to the code
    return None


def classify(code: grpc.StatusCode, reason: Reason | None = None) -> Fault:
    """The fault of a call that ended with ``code`` (and the server's ``reason``, when it sent one)."""
    if code in _RETRYABLE_CODES:
        return Fault.RETRYABLE
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Fault.UNAUTHENTICATED
    if reason == Reason.ACTIVATIONS_GONE:
        return Fault.ACTIVATIONS_GONE
    if reason == Reason.SESSION_GONE or (reason is None and code == grpc.StatusCode.NOT_FOUND):
        return Fault.SESSION_GONE
    if reason in (Reason.FULL, Reason.OUT_OF_MEMORY):
        return Fault.FULL
    if reason is None and code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Fault.RETRYABLE  # grpc's own cap on concurrent calls: the call never started
    return Fault.BAD_REQUEST


def overloaded(code: grpc.StatusCode, reason: Reason | None) -> bool:
    """gRPC refused the call at the server's cap on concurrent calls, before it started (the server's own
    refusals always carry a reason)."""
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and reason is None


class TrunkError(RuntimeError):
    """A trunk call failed for good: ``code`` (gRPC status), ``details`` (the server's words), ``reason``
    (from the server's trailing metadata, None when it sent none) and ``fault``."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: Reason | None = None,
                 fault: Fault | None = None) -> None:
        super().__init__(f"trunk {code.name}: {message}")
        self.code = code
        self.details = message
        self.reason = reason
        self.fault = fault or classify(code, reason)
        self.trunk: str | None = None  # the name of the trunk (the link of a chain) that failed, when known

    @classmethod
    def from_rpc(cls, error: grpc.RpcError, retried: bool = False) -> TrunkError:
        """From a failed call; ``retried``: the retries of a retryable error are used up (the trunk is lost)."""
        code = error.code()
        fault = Fault.LOST if retried and code in _RETRYABLE_CODES else None
        return cls(code, error.details() or "", reason_of(error.trailing_metadata()), fault)

    def explain(self, where: str, session: str = "the session") -> str:
        """The error in a user's words; ``where`` names the trunk ("the trunk server X at host:port")."""
        status = f"{self.code.name}: {self.details}" if self.details else self.code.name
        if self.fault in (Fault.RETRYABLE, Fault.LOST):
            return f"{where} could not be reached ({status})"
        if self.fault == Fault.UNAUTHENTICATED:
            return (f"{where} refused the token (UNAUTHENTICATED); an administrator must enter the token the "
                    "trunk server was started with (its TRUNK_TOKEN)")
        if self.fault == Fault.SESSION_GONE:
            return f"{where} lost {session} (it restarted, or the session's lease ran out)"
        if self.reason == Reason.OUT_OF_MEMORY:
            return f"{where} ran out of memory ({self.details})"
        if self.fault == Fault.FULL:
            if self.reason == Reason.FULL:
                return f"{where} is at its session capacity"
            return f"{where} is busy: it is at its limit of concurrent calls ({status})"
        return f"{where} refused the request ({status})"
