"""A gRPC proxy for tests: it stands where a trunk server stands and records what the trunk receives.

Every call is forwarded as raw bytes (no deserialisation on the way, so nothing the client sends
is changed) to the real trunk behind it, and each request message is recorded as
(method, call number, bytes). The tests decode the record with the project's own protobuf
messages and wire format (``splitcore.remote.wire``), never pickle. Errors of the real trunk
come back to the client with their status, details and trailing metadata (the refusal reasons the
client acts on), so the client cannot tell the proxy from the trunk.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import torch
from google.protobuf.message import Message

from splitcore.remote.proto import trunk_pb2 as pb
from splitcore.remote.wire import decode_tensor, join_messages

SERVICE = pb.DESCRIPTOR.services_by_name["Trunk"]
# Far above what the tests send; join_messages refuses a stream beyond it.
MAX_CALL_BYTES = 1 << 30
MAX_MESSAGE_BYTES = 64 << 20
# What the client's own metadata carries that the trunk needs (its bearer token).
FORWARDED_METADATA = ("authorization",)


@dataclass(frozen=True)
class Recorded:
    """One request message the trunk received: the RPC's short name ("Forward"), the number of the call it
    belongs to (the chunks of one streamed request share it) and its bytes as sent."""

    method: str
    call: int
    payload: bytes


class RecordingProxy(grpc.GenericRpcHandler):
    """Forwards every call to ``upstream`` unchanged and records each request message it relays."""

    def __init__(self, upstream: str) -> None:
        self.channel = grpc.insecure_channel(upstream, options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        self._records: list[Recorded] = []
        self._lock = threading.Lock()
        self._calls = itertools.count()

    # ------------------------------------------------------------------ forwarding

    def service(self, details: grpc.HandlerCallDetails):
        service_name, _, name = details.method.lstrip("/").rpartition("/")
        method = SERVICE.methods_by_name.get(name) if service_name == SERVICE.full_name else None
        # Another service (the standard health check) answers unary calls here.
        client_streaming = bool(method and method.client_streaming)
        server_streaming = bool(method and method.server_streaming)
        kind = f"{'stream' if client_streaming else 'unary'}_{'stream' if server_streaming else 'unary'}"
        upstream = getattr(self.channel, kind)(details.method)
        short = name if method is not None else details.method

        def record(call: int, payload: bytes) -> bytes:
            with self._lock:
                self._records.append(Recorded(short, call, payload))
            return payload

        def forward(request, context: grpc.ServicerContext):
            call = next(self._calls)
            if client_streaming:
                request = (record(call, payload) for payload in request)
            else:
                request = record(call, request)
            metadata = tuple((key, value) for key, value in context.invocation_metadata()
                             if key in FORWARDED_METADATA)
            try:
                reply = upstream(request, metadata=metadata, timeout=context.time_remaining())
                if server_streaming:
                    return _relay(reply, context)
                return reply
            except grpc.RpcError as error:
                _abort_like(error, context)

        handler = getattr(grpc, f"{kind}_rpc_method_handler")
        return handler(forward)

    # ------------------------------------------------------------------ reading the record

    def records(self, method: str | None = None) -> list[Recorded]:
        with self._lock:
            return [r for r in self._records if method is None or r.method == method]

    @property
    def requests(self) -> list[tuple[str, bytes]]:
        """(method, bytes) of every request message relayed so far, in order."""
        return [(record.method, record.payload) for record in self.records()]

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    def calls(self, method: str) -> list[Message]:
        """The requests of each call of ``method`` in the order they came, streamed chunks joined, parsed with
        the project's message type."""
        request_type = pb.DESCRIPTOR.message_types_by_name[SERVICE.methods_by_name[method].input_type.name]
        message_class = getattr(pb, request_type.name)
        grouped: dict[int, list[Message]] = {}
        for record in self.records(method):
            grouped.setdefault(record.call, []).append(message_class.FromString(record.payload))
        return [join_messages(messages, MAX_CALL_BYTES) for _, messages in sorted(grouped.items())]

    def hidden_states(self, session_id: str | None = None) -> list[tuple[pb.ForwardRequest, torch.Tensor]]:
        """Every Forward's request and the hidden states (batch, seq, hidden) it carried, decoded as the trunk
        decodes them; of one session when ``session_id`` is given."""
        return [(request, decode_tensor(request.hidden, "hidden")) for request in self.calls("Forward")
                if session_id is None or request.session_id == session_id]


def _relay(replies: Iterator, context: grpc.ServicerContext) -> Iterator:
    try:
        yield from replies
    except grpc.RpcError as error:
        _abort_like(error, context)


def _abort_like(error: grpc.RpcError, context: grpc.ServicerContext) -> None:
    """End the call as the trunk ended it: its code, details and trailing metadata (the refusal reason)."""
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    if trailing:
        context.set_trailing_metadata(tuple(trailing))
    context.abort(error.code(), error.details() or "")


@dataclass
class ProxyServer:
    """A running proxy: ``address`` is where clients connect instead of the trunk."""

    proxy: RecordingProxy
    server: grpc.Server
    address: str

    def stop(self) -> None:
        self.server.stop(None)
        self.proxy.channel.close()


def start_proxy(upstream: str) -> ProxyServer:
    """A recording proxy on a free loopback port in front of the trunk at ``upstream``."""
    proxy = RecordingProxy(upstream)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), handlers=[proxy], options=[
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return ProxyServer(proxy, server, f"127.0.0.1:{port}")
