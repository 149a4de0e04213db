"""Bearer-token authentication for every RPC except the standard health check."""

from __future__ import annotations

import hmac
from collections.abc import Callable

import grpc

HEALTH_PREFIX = "/grpc.health.v1.Health/"
# Told of each refused call: (RPC name, status code name, seconds it took).
RefusalCounter = Callable[[str, str, float], None]


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Aborts with UNAUTHENTICATED unless ``authorization: Bearer <token>`` matches; ``count`` (if given)
    is told of each call it refuses."""

    def __init__(self, token: str, count: RefusalCounter | None = None) -> None:
        self._expected = f"Bearer {token}".encode()
        self._count = count

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        presented = str(metadata.get("authorization", "")).encode()
        if hmac.compare_digest(presented, self._expected):
            return handler
        reason = "missing authorization" if not presented else "invalid bearer token"
        return _denying(handler, reason, handler_call_details.method.rsplit("/", 1)[-1], self._count)


def _denying(handler: grpc.RpcMethodHandler, reason: str, rpc: str,
             count: RefusalCounter | None) -> grpc.RpcMethodHandler:
    def deny(_request, context):
        if count is not None:
            count(rpc, grpc.StatusCode.UNAUTHENTICATED.name, 0.0)
        context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{reason}: send 'authorization: Bearer <trunk token>'")

    def deny_stream(_request, context):
        deny(_request, context)
        yield  # pragma: no cover - abort raises

    kwargs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    return grpc.stream_stream_rpc_method_handler(deny_stream, **kwargs)
