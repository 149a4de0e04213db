"""Requests are parsed inside the RPC, so a message that does not parse answers INVALID_ARGUMENT.

grpc parses each request before the handler sees it and answers one it cannot parse with
INTERNAL ("Exception deserializing request!"). In a request stream it also stops reading
at the bad message and the handler goes on with the messages before it, acting on a
partial request. This interceptor hands the handler raw bytes and parses them itself.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from splitcore.remote.wire import WireError

from .auth import RefusalCounter


class RequestParsingInterceptor(grpc.ServerInterceptor):
    """For the methods under ``service_prefix``: parse in the handler, refuse junk with a reason. ``count``
    (if given) is told of each single request refused here; a stream's bad message is refused (and
    counted) by the servicer."""

    def __init__(self, service_prefix: str, count: RefusalCounter | None = None) -> None:
        self._prefix = service_prefix
        self._count = count

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if (handler is None or handler.request_deserializer is None
                or not handler_call_details.method.startswith(self._prefix)):
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        return _parsing(handler, _parser(handler.request_deserializer, method), method, self._count)


def _parser(deserialize, method: str):
    def parse(payload: bytes, index: int | None = None):
        try:
            return deserialize(payload)
        except DecodeError as exc:
            which = "the request" if index is None else f"message {index + 1} of the request stream"
            # WireError: the servicer answers it with INVALID_ARGUMENT, like any malformed request.
            raise WireError(f"{which} is not a valid {method} request ({exc}); "
                            "use the generated client for this service") from None

    return parse


def _parsing(handler: grpc.RpcMethodHandler, parse, method: str,
             count: RefusalCounter | None) -> grpc.RpcMethodHandler:
    def unary(behavior):
        def call(payload, context):
            try:
                request = parse(payload)
            except WireError as exc:
                if count is not None:
                    count(method, grpc.StatusCode.INVALID_ARGUMENT.name, 0.0)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return behavior(request, context)

        return call

    def stream(behavior):
        # Parsed as the servicer reads the stream: a bad message raises there, in its error mapping.
        def call(payloads, context):
            return behavior((parse(payload, index) for index, payload in enumerate(payloads)), context)

        return call

    serializer = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), response_serializer=serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(unary(handler.unary_stream), response_serializer=serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(stream(handler.stream_unary), response_serializer=serializer)
    return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), response_serializer=serializer)
