"""TrunkClient: the data owner's side of the trunk protocol.

Adds the bearer token to every call, sets deadlines, retries UNAVAILABLE and
DEADLINE_EXCEEDED with exponential backoff (safe: the server's steps are idempotent),
waits out gRPC's refusals at the server's cap on concurrent calls (with backoff, for up to a
call's timeout in all), streams large tensors in chunks, and counts the bytes that cross the wire.
"""

from __future__ import annotations

import itertools
import logging
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
import torch

from splitcore.model.lora import LoraSettings
from splitcore.remote.errors import Fault, TrunkError, overloaded
from splitcore.remote.messages import OptimizerSettings, lora_to_proto, optimizer_to_proto
from splitcore.remote.proto import trunk_pb2 as pb
from splitcore.remote.proto import trunk_pb2_grpc as pb_grpc
from splitcore.remote.wire import (
    check_encoding,
    decode_tensor,
    encode_mask,
    encode_tensor,
    encoded_size,
    join_messages,
    split_message,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# Upper bound of one reassembled reply stream (an exported trunk state can be large).
MAX_REPLY_BYTES = 1 << 34


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    multiplier: float = 2.0

    def delays(self):
        """The waits between the attempts: ``attempts - 1`` of them."""
        return itertools.islice(self.backoff(), self.attempts - 1)

    def backoff(self):
        """Exponential waits, capped at ``max_backoff_s``, without end."""
        delay = self.initial_backoff_s
        while True:
            yield delay
            delay = min(self.max_backoff_s, delay * self.multiplier)


class TrunkClient:
    def __init__(
        self,
        address: str,
        token: str,
        wire_encoding: str = "fp32",
        timeout_s: float = 120.0,
        retry: RetryPolicy = RetryPolicy(),
        root_certificates: bytes | None = None,
        max_message_bytes: int = 8 << 20,
        use_tls: bool = False,
        name: str | None = None,
    ) -> None:
        """TLS when ``use_tls`` or ``root_certificates`` (PEM of the CA; None: the system's roots).

        ``name`` (default: the address) names this trunk in errors and logs; a ``TrunkError`` it raises
        carries it as ``trunk``, so the link of a chain that failed is known."""
        self.address = address
        self.name = name or address
        self.wire_encoding = check_encoding(wire_encoding)
        self.timeout_s = timeout_s
        self.retry = retry
        self.chunk_bytes = max_message_bytes // 2
        self._max_message_bytes = max_message_bytes
        self._metadata = (("authorization", f"Bearer {token}"),)
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        if use_tls or root_certificates is not None:
            self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates), options)
        else:
            self._channel = grpc.insecure_channel(address, options)
        self._stub = pb_grpc.TrunkStub(self._channel)
        self.session_id: str | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.overload_retries = 0  # calls the server turned away at its cap on concurrent calls, then retried

    @property
    def channel(self) -> grpc.Channel:
        """The client's channel (auth-free services such as gRPC health use it too)."""
        return self._channel

    # -------------------------------------------------------------- plumbing

    def _call(self, what: str, call: Callable[[], T]) -> T:
        delays = self.retry.delays()
        busy_waited, busy_delays = 0.0, self.retry.backoff()
        while True:
            try:
                return call()
            except grpc.RpcError as error:
                failure = TrunkError.from_rpc(error)
                failure.trunk = self.name
                if failure.fault != Fault.RETRYABLE:
                    raise failure from None
                if overloaded(failure.code, failure.reason) and busy_waited < self.timeout_s:
                    # The server turned the call away at its cap on concurrent calls: it is busy, not gone.
                    delay = next(busy_delays) * random.uniform(0.5, 1.0)  # spread the retries of many clients
                    busy_waited += delay
                    self.overload_retries += 1
                    log.info("%s: trunk %s is at its cap on concurrent calls; retrying in %.1fs", what, self.name, delay)
                    time.sleep(delay)
                    continue
                delay = next(delays, None)
                if delay is None:
                    failure.fault = Fault.LOST  # the retries are used up
                    raise failure from None
                log.warning("%s: trunk %s %s (%s); retrying in %.1fs", what, self.name, failure.code.name, failure.details, delay)
                time.sleep(delay)

    def _unary(self, method, request):
        return self._call(type(request).__name__,
                          lambda: method(request, timeout=self.timeout_s, metadata=self._metadata))

    def _streaming(self, method, request):
        """Stream in, stream out: the request in chunks, the reply joined back."""
        chunks = list(split_message(request, self.chunk_bytes))

        def call():
            replies = method(iter(chunks), timeout=self.timeout_s, metadata=self._metadata)
            return join_messages(replies, max_total_bytes=MAX_REPLY_BYTES)

        return self._call(type(request).__name__, call)

    def _streaming_unary(self, method, request):
        """Stream in, one reply out."""
        chunks = list(split_message(request, self.chunk_bytes))
        return self._call(type(request).__name__,
                          lambda: method(iter(chunks), timeout=self.timeout_s, metadata=self._metadata))

    def _require_session(self) -> str:
        if self.session_id is None:
            raise RuntimeError("no open trunk session: call open_session() first")
        return self.session_id

    def _tensor(self, tensor: torch.Tensor) -> pb.Tensor:
        message = encode_tensor(tensor, self.wire_encoding)
        self.bytes_sent += encoded_size(message)
        return message

    def _mask(self, mask: torch.Tensor) -> pb.Tensor:
        message = encode_mask(mask)
        self.bytes_sent += encoded_size(message)
        return message

    def _received(self, message: pb.Tensor, field: str, like: torch.Tensor) -> torch.Tensor:
        """A reply tensor of ``like``'s shape, on its device and in its dtype."""
        self.bytes_received += encoded_size(message)
        tensor = decode_tensor(message, field, expected_shape=tuple(like.shape))
        return tensor.to(device=like.device, dtype=like.dtype)

    # -------------------------------------------------------------- RPCs

    def info(self) -> pb.InfoResponse:
        return self._unary(self._stub.Info, pb.InfoRequest())

    def open_session(self, lora: LoraSettings | None, seed: int = 0, optimizer: OptimizerSettings = OptimizerSettings(),
                     inference: bool = False, label: str = "", layers: range | None = None,
                     dropout_seed: int | None = None) -> pb.OpenSessionResponse:
        """Open a session running the blocks ``layers`` (None: the trunk's default cut).

        ``seed`` seeds the trunk's LoRA initialisation and (unless ``dropout_seed`` is given) its dropout
        masks. Training runs send a value derived from their run seed with their client secret, never
        the run seed itself.
        Every try of this call carries the same open key, so a retried open returns the session
        the first try opened.
        """
        request = pb.OpenSessionRequest(
            mode=pb.SESSION_MODE_INFERENCE if inference else pb.SESSION_MODE_TRAIN,
            optimizer=optimizer_to_proto(optimizer), wire_encoding=self.wire_encoding, client_label=label,
            dropout_seed=seed if dropout_seed is None else dropout_seed, open_key=secrets.token_hex(16),
        )
        if layers is not None:
            request.trunk_start, request.trunk_end = layers.start, layers.stop
        if lora is not None:
            request.lora.CopyFrom(lora_to_proto(lora, seed))
        reply = self._unary(self._stub.OpenSession, request)
        self.session_id = reply.session_id
        if reply.info.max_message_bytes:
            self.chunk_bytes = min(self._max_message_bytes, reply.info.max_message_bytes) // 2
        return reply

    def forward(self, step: int, micro_batch: int, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        request = pb.ForwardRequest(session_id=self._require_session(), step=step, micro_batch=micro_batch,
                                    hidden=self._tensor(hidden), attention_mask=self._mask(attention_mask))
        reply = self._streaming(self._stub.Forward, request)
        return self._received(reply.hidden, "hidden", hidden)

    def evaluate(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Training session: a validation forward (no gradient, nothing kept on the trunk)."""
        request = pb.ForwardRequest(session_id=self._require_session(), evaluate=True,
                                    hidden=self._tensor(hidden), attention_mask=self._mask(attention_mask))
        reply = self._streaming(self._stub.Forward, request)
        return self._received(reply.hidden, "hidden", hidden)

    def backward(self, step: int, micro_batch: int, grad_output: torch.Tensor,
                 hidden: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Send the output gradient; resend the inputs only if the server lost the activations."""
        request = pb.BackwardRequest(session_id=self._require_session(), step=step, micro_batch=micro_batch,
                                     grad_output=self._tensor(grad_output))
        try:
            reply = self._streaming(self._stub.Backward, request)
        except TrunkError as error:
            if error.fault != Fault.ACTIVATIONS_GONE:
                raise
            log.info("trunk lost the activations of step %s micro-batch %s; resending inputs", step, micro_batch)
            request.hidden.CopyFrom(self._tensor(hidden))
            request.attention_mask.CopyFrom(self._mask(attention_mask))
            reply = self._streaming(self._stub.Backward, request)
        grad_input = self._received(reply.grad_input, "grad_input", hidden)
        return grad_input, reply.trunk_grad_sq_norm

    def step(self, step: int, lr: float, clip_coef: float = 1.0) -> int:
        request = pb.StepRequest(session_id=self._require_session(), step=step, lr=lr, clip_coef=clip_coef)
        return self._unary(self._stub.Step, request).applied_step

    def keep_alive(self) -> None:
        """Renew the training session's lease and change nothing: a Step for step 0, which every session
        has applied (an applied step is never applied again), so any trunk version answers it."""
        self.step(0, lr=0.0)

    def infer(self, step: int, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Inference session: append ``hidden`` to the trunk's KV cache and return its output."""
        return self.forward(step, 0, hidden, attention_mask)

    def export_state(self) -> tuple[int, bytes]:
        request = pb.ExportStateRequest(session_id=self._require_session())

        def call():
            replies = self._stub.ExportState(request, timeout=self.timeout_s, metadata=self._metadata)
            return join_messages(replies, max_total_bytes=MAX_REPLY_BYTES)

        reply = self._call("ExportStateRequest", call)
        self.bytes_received += len(reply.safetensors)
        return reply.step, reply.safetensors

    def import_state(self, step: int, data: bytes) -> int:
        request = pb.ImportStateRequest(session_id=self._require_session(), step=step, safetensors=data)
        self.bytes_sent += len(data)
        return self._streaming_unary(self._stub.ImportState, request).step

    def close_session(self) -> None:
        if self.session_id is None:
            return
        try:
            self._unary(self._stub.CloseSession, pb.CloseSessionRequest(session_id=self.session_id))
        except TrunkError as error:
            if error.fault != Fault.SESSION_GONE:
                raise
        finally:
            self.session_id = None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TrunkClient:
        return self

    def close_session_quietly(self) -> None:
        """Close the session if the trunk can be reached; otherwise it expires on the trunk by itself."""
        try:
            self.close_session()
        except TrunkError as error:
            log.warning("could not close the trunk session (%s); it will expire on the trunk", error)

    def __exit__(self, *exc) -> None:
        try:
            self.close_session_quietly()
        finally:
            self.close()
