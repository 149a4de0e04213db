"""The gRPC servicer: decode, call the session, encode, map errors to codes.

Every refusal ends with the status code and the reason that ``splitcore.remote.errors``
gives it (the reason in the trailing metadata) and a message that says what and where;
the server keeps serving.
"""

from __future__ import annotations

import functools
import logging
import time

import grpc

from splitcore import __version__
from splitcore.model.lora import methods_for
from splitcore.remote.errors import REASON_KEY, STATUS, Reason, TrunkRefusal
from splitcore.remote.messages import lora_from_proto, optimizer_from_proto
from splitcore.remote.proto import trunk_pb2 as pb
from splitcore.remote.proto import trunk_pb2_grpc as pb_grpc
from splitcore.remote.wire import (
    WireError,
    check_encoding,
    decode_tensor,
    encode_tensor,
    join_messages,
    split_message,
)

from .config import TrunkServerConfig
from .host import TrunkHost
from .sessions import SessionRegistry, SessionRequest
from .turns import call_deadline

log = logging.getLogger("trunk_server")


def _reason(exc: Exception) -> Reason | None:
    if isinstance(exc, TrunkRefusal):
        return exc.reason
    if isinstance(exc, (WireError, ValueError)):
        return Reason.BAD_REQUEST
    return None


def _mapped_errors(method):
    """Translate exceptions into status codes and reasons, in one place; count each call by its code."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            with call_deadline(context.time_remaining()):
                return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            reason = _reason(exc)
            if reason is not None:
                code = STATUS[reason]
                context.set_trailing_metadata(((REASON_KEY, reason.value),))
                context.abort(code, str(exc))
            log.exception("internal error in %s", method.__name__)
            code = grpc.StatusCode.INTERNAL
            context.abort(code, f"internal error: {type(exc).__name__}")
        finally:  # context.abort raises: the call is counted on its way out either way
            self.host.stats.request_done(method.__name__, code.name, time.perf_counter() - started)

    return wrapper


class TrunkServicer(pb_grpc.TrunkServicer):
    def __init__(self, config: TrunkServerConfig, host: TrunkHost, registry: SessionRegistry) -> None:
        self.config = config
        self.host = host
        self.registry = registry

    # -------------------------------------------------------------- helpers

    def _hidden(self, message: pb.Tensor, field: str, batch_seq: tuple[int, int] | None = None):
        expected = (None, None, self.host.hidden_size) if batch_seq is None else (*batch_seq, self.host.hidden_size)
        if not message.ByteSize():
            raise WireError(f"{field} is missing")
        hidden = decode_tensor(message, field, expected_shape=expected)
        if not hidden.numel():  # the model's blocks cannot run on an empty batch or sequence
            raise WireError(f"{field}: shape {list(hidden.shape)} is empty; send at least one row of one position")
        return hidden

    def _mask(self, message: pb.Tensor, batch: int, min_length: int):
        if not message.ByteSize():
            raise WireError("attention_mask is missing")
        mask = decode_tensor(message, "attention_mask", expected_shape=(batch, None))
        if mask.dtype.is_floating_point or mask.shape[1] < min_length:
            raise WireError(f"attention_mask must be 0/1 of shape ({batch}, >= {min_length}), "
                            f"got {list(mask.shape)}")
        return mask

    def _join(self, request_iterator):
        return join_messages(request_iterator, self.config.max_request_bytes)

    def _stream(self, reply):
        return iter(list(split_message(reply, self.config.chunk_bytes)))

    def info(self, layers: range | None = None) -> pb.InfoResponse:
        """What this server hosts; with ``layers``, as seen by a session running those blocks."""
        layers = self.host.bounds.default if layers is None else layers
        budgets = self.config.budgets
        active = self.registry.active_count()  # expires stale sessions first: then they are counted below
        stats = self.host.stats.snapshot()
        return pb.InfoResponse(
            model_id=self.host.model_id, weights_fingerprint=self.host.fingerprint_of(layers),
            model_type=self.host.config.model_type, num_layers=self.host.num_layers,
            trunk_start=layers.start, trunk_end=layers.stop, hidden_size=self.host.hidden_size,
            dtype=str(self.host.dtype).removeprefix("torch."), max_sessions=self.registry.max_sessions,
            active_sessions=active, version=__version__,
            max_message_bytes=self.config.max_message_bytes, session_ttl_s=self.config.session_lease_s,
            min_trunk_start=self.host.bounds.lowest, max_trunk_end=self.host.bounds.highest,
            device=str(self.host.device), memory_total_bytes=self.host.memory_total(),
            memory_base_bytes=self.host.base_bytes,
            memory_sessions_bytes=self.host.memory_beyond_base(self.registry.sessions_bytes()),
            max_lora_rank=budgets.max_lora_rank, max_micro_batches=budgets.max_micro_batches,
            max_tokens_per_request=budgets.max_tokens_per_request, max_positions=self.host.max_positions,
            max_kv_tokens=budgets.max_kv_tokens, max_saved_graphs=budgets.max_saved_graphs,
            uptime_s=stats.uptime_s, sessions_opened=sum(stats.sessions_opened.values()),
            sessions_closed=stats.sessions_ended["closed"], sessions_expired=stats.sessions_ended["expired"],
            tokens_processed=sum(stats.tokens.values()), busy_s=stats.busy_s,
            adapter_methods=list(methods_for(self.host.family)),
            max_session_memory_bytes=budgets.max_session_memory_mb << 20,
        )

    # -------------------------------------------------------------- RPCs

    @_mapped_errors
    def Info(self, request, context):
        return self.info()

    @_mapped_errors
    def OpenSession(self, request, context):
        if request.mode not in (pb.SESSION_MODE_TRAIN, pb.SESSION_MODE_INFERENCE):
            raise ValueError(f"mode must be SESSION_MODE_TRAIN or SESSION_MODE_INFERENCE, got {request.mode}")
        wanted = SessionRequest(
            inference=request.mode == pb.SESSION_MODE_INFERENCE,
            lora=lora_from_proto(request.lora) if request.HasField("lora") else None,
            optimizer=optimizer_from_proto(request.optimizer),
            wire_encoding=check_encoding(request.wire_encoding or "fp32"), label=request.client_label[:200],
            layers=self.host.layers_for(request.trunk_start, request.trunk_end), dropout_seed=request.dropout_seed)
        session, opened = self.registry.open(wanted, request.open_key)
        layers = session.layers
        if opened:
            log.info("opened session %s (%s, layers %s-%s, trunk LoRA %s) for %r", session.id[:8],
                     "inference" if session.inference else "training", layers.start, layers.stop - 1,
                     "on" if wanted.lora else "off", session.label)
        else:
            log.info("OpenSession retried with the key of session %s: the same session", session.id[:8])
        return pb.OpenSessionResponse(session_id=session.id, info=self.info(layers))

    @_mapped_errors
    def Forward(self, request_iterator, context):
        request = self._join(request_iterator)
        with self.registry.use(request.session_id) as session:
            hidden = self._hidden(request.hidden, "hidden")
            batch, seq = hidden.shape[:2]

            def encode(output):
                return pb.ForwardResponse(hidden=encode_tensor(output, session.wire_encoding))

            mask = self._mask(request.attention_mask, batch, seq)
            if session.inference and not request.evaluate:
                reply = session.infer(request.step, hidden, mask, encode)
            else:
                if mask.shape[1] != seq:
                    raise WireError(f"attention_mask must be ({batch}, {seq}) in training, got {list(mask.shape)}")
                if request.evaluate:
                    reply = encode(session.evaluate(hidden, mask))
                else:
                    reply = session.forward(request.step, request.micro_batch, hidden, mask, encode)
            return self._stream(reply)

    @_mapped_errors
    def Backward(self, request_iterator, context):
        request = self._join(request_iterator)
        with self.registry.use(request.session_id) as session:
            resent = None
            if request.HasField("hidden"):
                hidden = self._hidden(request.hidden, "hidden")
                batch, seq = hidden.shape[:2]
                mask = self._mask(request.attention_mask, batch, seq)
                if mask.shape[1] != seq:
                    raise WireError(f"attention_mask must be ({batch}, {seq}) like the resent hidden states, "
                                    f"got {list(mask.shape)}")
                resent = (hidden, mask)

            def grad_output(shape):
                if not request.grad_output.ByteSize():
                    raise WireError("grad_output is missing")
                return decode_tensor(request.grad_output, "grad_output", expected_shape=shape)

            def encode(grad_input, sq_norm):
                return pb.BackwardResponse(grad_input=encode_tensor(grad_input, session.wire_encoding),
                                           trunk_grad_sq_norm=sq_norm)

            reply = session.backward(request.step, request.micro_batch, grad_output, resent, encode)
            return self._stream(reply)

    @_mapped_errors
    def Step(self, request, context):
        with self.registry.use(request.session_id) as session:
            return pb.StepResponse(applied_step=session.step(request.step, request.lr, request.clip_coef))

    @_mapped_errors
    def ExportState(self, request, context):
        with self.registry.use(request.session_id) as session:
            data = session.export_state()
            return self._stream(pb.ExportStateResponse(step=session.applied_step, safetensors=data))

    @_mapped_errors
    def ImportState(self, request_iterator, context):
        request = self._join(request_iterator)
        with self.registry.use(request.session_id) as session:
            if request.step < 0:
                raise ValueError(f"step must be >= 0, got {request.step}")
            return pb.ImportStateResponse(step=session.import_state(request.step, request.safetensors))

    @_mapped_errors
    def CloseSession(self, request, context):
        self.registry.close(request.session_id)  # it logs the session's summary
        return pb.CloseSessionResponse()
