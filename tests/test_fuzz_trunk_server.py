"""Property-based fuzzing of the trunk protocol.

The wire decoder, alone: a mutated tensor decodes to exactly the declared shape and
dtype (finite floats, 0/1 masks) or raises ``WireError`` naming the field.

A real trunk server process over gRPC: random and mutated requests of every RPC, and raw
bytes that are no request at all, each end with a proper status (OK, INVALID_ARGUMENT,
NOT_FOUND or FAILED_PRECONDITION) and a reason, never UNKNOWN or INTERNAL and never a
hang (every call has a deadline); valid requests end with OK. After every example the
server still answers Info, holds no session the example left behind, and a canary
session's Forward still returns exactly what it returned at the start.
"""

from __future__ import annotations

import math
import re
import secrets
from contextlib import contextmanager

import grpc
import pytest
import torch
from fuzzing import examples, mutated
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from trunk_calls import HIDDEN, LORA, inputs, raw_stub
from trunk_process import start_trunk

from splitcore.remote.client import RetryPolicy, TrunkClient
from splitcore.remote.messages import lora_to_proto
from splitcore.remote.proto import trunk_pb2 as pb
from splitcore.remote.wire import (
    DEFAULT_MAX_ELEMENTS,
    FLOAT_ENCODINGS,
    MASK_ENCODING,
    WireError,
    decode_tensor,
    encode_mask,
    encode_tensor,
    join_messages,
    split_message,
)

# A hang fails the test instead of stalling the run.
pytestmark = pytest.mark.timeout(600)

DEADLINE_S = 30
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT32_MAX = 2**32 - 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int64": torch.int64}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
Code = grpc.StatusCode
# How any request may end; the tests stay below the session cap and the message size limit,
# so RESOURCE_EXHAUSTED is a bug here too, unless a session's budget refused the request.
PROPER = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION}
BUDGET_REFUSAL = re.compile(r"beyond this trunk's budget|longer than the model's \d+ positions")

# ---------------------------------------------------------------- strategies: tensors

SPECIAL_FLOATS = (math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, 65504.0, 65520.0, 1e30, 3.4e38, -3.4e38)
dtype_names = st.sampled_from(list(DTYPES)) | st.sampled_from(
    ["", "float64", "complex64", "int8", "uint8", "bool", "Float32", "torch.float32"]) | st.text(max_size=8)
encodings = st.sampled_from([*FLOAT_ENCODINGS, MASK_ENCODING]) | st.sampled_from(
    ["", "fp8", "FP32", "int4", "u16", "fp64"]) | st.text(max_size=6)
dims = st.integers(0, 6) | st.integers(-3, -1) | st.sampled_from(
    [64, 2**28, 2**31, 2**32 + 1, 2**62, INT64_MAX, INT64_MIN])
block_sizes = st.integers(0, UINT32_MAX) | st.sampled_from([0, 1, 3, 63, 64, 65, 65536, 65537])
# Bytes that matter to protobuf: varint continuation, field tags, lengths.
proto_bytes = st.sampled_from([b"\x00", b"\x80", b"\xff" * 10, b"\x08", b"\x12", b"\x22", b"\x0a\x7f", b"\x7f"])


def float_bytes(value: float, encoding: str) -> bytes:
    """One value as it would sit in ``data``."""
    if encoding == "int8":
        return bytes([int(value) & 0xFF]) if math.isfinite(value) else b"\x80"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(encoding, torch.float32)
    encoded = torch.tensor([value]).to(dtype)
    return (encoded.view(torch.int16) if dtype == torch.bfloat16 else encoded).numpy().tobytes()


@st.composite
def float_values(draw, shape: tuple[int, ...], special: bool = True) -> torch.Tensor:
    """Random normal values; with ``special``, sometimes NaN, inf or extreme values among them."""
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32)))
    values = torch.randn(shape, generator=generator) * draw(st.sampled_from([1.0, 1e-3, 100.0]))
    flat = values.reshape(-1)
    if special and flat.numel() and draw(st.integers(0, 4)) == 0:
        for _ in range(draw(st.integers(1, 3))):
            flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from(SPECIAL_FLOATS))
    return values


@st.composite
def valid_tensors(draw, shape: tuple[int, ...] | None = None, special: bool = True, masks: bool = True) -> pb.Tensor:
    """A tensor as ``encode_tensor`` (or, with ``masks``, ``encode_mask``) would send it;
    with ``special``, maybe holding NaN, inf or extreme values."""
    if shape is None:
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
    if masks and draw(st.integers(0, 5)) == 0:
        generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32)))
        return encode_mask(torch.randint(0, 2, shape, generator=generator))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    return encode_tensor(draw(float_values(shape, special)).to(dtype), draw(st.sampled_from(FLOAT_ENCODINGS)))


@st.composite
def edited_bytes(draw, data: bytes) -> bytes:
    edit = draw(st.sampled_from(["truncate", "extend", "replace", "empty", "mutate"]))
    if edit == "truncate":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if edit == "extend":
        return data + draw(st.binary(min_size=1, max_size=16))
    if edit == "replace":
        return draw(st.binary(max_size=64))
    if edit == "empty":
        return b""
    return draw(mutated(data, proto_bytes, max_huge=64))


@st.composite
def mutated_tensors(draw, base: pb.Tensor) -> pb.Tensor:
    """``base`` with one to three fields changed: dtype, encoding, shape, data, scales, block size."""
    tensor = pb.Tensor()
    tensor.CopyFrom(base)
    for _ in range(draw(st.integers(1, 3))):
        change = draw(st.sampled_from(["dtype", "encoding", "shape", "dim", "data", "value", "scales", "block_size"]))
        if change == "dtype":
            tensor.dtype = draw(dtype_names)
        elif change == "encoding":
            tensor.encoding = draw(encodings)
        elif change == "shape":
            del tensor.shape[:]
            tensor.shape.extend(draw(st.lists(dims, max_size=9)))
        elif change == "dim" and tensor.shape:
            tensor.shape[draw(st.integers(0, len(tensor.shape) - 1))] = draw(dims)
        elif change == "data":
            tensor.data = draw(edited_bytes(tensor.data))
        elif change == "value" and tensor.data:
            width = {"fp32": 4, "bf16": 2, "fp16": 2}.get(tensor.encoding, 1)
            slot = draw(st.integers(0, max(0, len(tensor.data) // width - 1))) * width
            raw = float_bytes(draw(st.sampled_from(SPECIAL_FLOATS)), tensor.encoding)[:width]
            tensor.data = tensor.data[:slot] + raw + tensor.data[slot + len(raw):]
        elif change == "scales":
            special = st.lists(st.sampled_from(SPECIAL_FLOATS + (-1.0,)), min_size=1, max_size=4).map(
                lambda values: torch.tensor(values, dtype=torch.float32).numpy().tobytes())
            tensor.scales = draw(edited_bytes(tensor.scales) | special)
        elif change == "block_size":
            tensor.block_size = draw(block_sizes)
    return tensor


def tensors(shape: tuple[int, ...] | None = None):
    """Well-formed, mutated, or made of random fields."""
    return st.one_of(
        valid_tensors(shape),
        valid_tensors(shape).flatmap(mutated_tensors),
        st.builds(lambda dtype, shape, encoding, data, scales, block_size: pb.Tensor(
            dtype=dtype, shape=shape, encoding=encoding, data=data, scales=scales, block_size=block_size),
            dtype_names, st.lists(dims, max_size=4), encodings, st.binary(max_size=64), st.binary(max_size=16),
            block_sizes),
    )


# ---------------------------------------------------------------- the wire decoder, alone


def check_decode(message: pb.Tensor, max_elements: int = DEFAULT_MAX_ELEMENTS,
                 expected_shape: tuple[int | None, ...] | None = None) -> torch.Tensor | None:
    """Decode ``message``: the declared tensor, or a WireError that names the field."""
    try:
        tensor = decode_tensor(message, "fuzzed", max_elements=max_elements, expected_shape=expected_shape)
    except WireError as error:
        assert str(error).startswith("fuzzed: "), error
        return None
    assert list(tensor.shape) == list(message.shape)
    assert tensor.dtype == DTYPES[message.dtype]
    assert tensor.numel() <= max_elements
    if expected_shape is not None:
        assert len(expected_shape) == tensor.dim()
        assert all(e is None or e == d for e, d in zip(expected_shape, tensor.shape))
    if tensor.dtype.is_floating_point:
        assert bool(torch.isfinite(tensor).all()), "decoded NaN or infinite values"
    else:
        assert bool(((tensor == 0) | (tensor == 1)).all()), "a mask decoded to values other than 0 and 1"
    return tensor


@settings(max_examples=examples(300))
@given(message=valid_tensors(special=False))
def test_wire_tensors_as_sent_decode(message):
    assert check_decode(message) is not None


@settings(max_examples=examples(300))
@given(message=valid_tensors())
def test_wire_tensors_with_nan_inf_or_extreme_values_decode_finite_or_raise_wire_error(message):
    check_decode(message)


@settings(max_examples=examples(1000))
@given(message=valid_tensors().flatmap(mutated_tensors),
       max_elements=st.sampled_from([DEFAULT_MAX_ELEMENTS, 0, 1, 10, 1000]),
       expected_shape=st.none() | st.lists(st.none() | st.integers(0, 6), max_size=4).map(tuple))
def test_mutated_wire_tensors_decode_as_declared_or_raise_wire_error(message, max_elements, expected_shape):
    check_decode(message, max_elements, expected_shape)


@settings(max_examples=examples(1000))
@given(data=st.data())
def test_byte_mutated_wire_tensors_decode_as_declared_or_raise_wire_error(data):
    serialized = data.draw(valid_tensors(), label="tensor").SerializeToString()
    try:
        message = pb.Tensor.FromString(data.draw(mutated(serialized, proto_bytes, max_huge=64), label="bytes"))
    except DecodeError:  # not a Tensor message at all: the server's request parsing refuses it
        return
    check_decode(message)


# ---------------------------------------------------------------- a real trunk server
#
# Every example works in sessions it opens itself and closes at its end, and nothing it
# draws depends on what earlier examples did: an example replays exactly, so Hypothesis
# can shrink a failure and CI cannot flake. The canary session alone lives for the module.


def outcome(call) -> tuple[grpc.StatusCode, object, str]:
    try:
        return Code.OK, call(), ""
    except grpc.RpcError as error:
        return error.code(), None, error.details() or ""


def assert_proper(code: grpc.StatusCode, details: str, allowed=PROPER) -> None:
    event(code.name)  # --hypothesis-show-statistics shows how the examples ended
    assert code in allowed or (code == Code.RESOURCE_EXHAUSTED and BUDGET_REFUSAL.search(details)), \
        f"{code.name}: {details}"
    assert code == Code.OK or details.strip(), f"{code.name} without a reason"


LORA_SPEC = lora_to_proto(LORA, seed=1)


class Fuzzing:
    """The server under test, a raw stub on it, the canary session and a valid trunk state."""

    def __init__(self, trunk) -> None:
        self.trunk = trunk
        self.channel, self.stub, self.metadata = raw_stub(trunk)
        self.canary = TrunkClient(trunk.address, trunk.token, timeout_s=DEADLINE_S, retry=RetryPolicy(attempts=1))
        self.canary.open_session(LORA, seed=0)
        self.canary_step = 0
        self.canary_input = inputs(seed=4)[:2]
        self.canary_output = self.canary_forward()
        # A state after one applied step, so it holds optimizer moments as well as the adapter.
        with self.session("train") as session_id:
            self.forward(session_id, 1, 0, 2, 6)
            self.backward(session_id, 1, 0, 2, 6)
            assert self.unary(self.stub.Step, pb.StepRequest(session_id=session_id, step=1, lr=1e-3,
                                                             clip_coef=1.0))[0] == Code.OK
            code, replies, details = self.export(session_id)
            assert code == Code.OK, details
            self.state = join_messages(replies, max_total_bytes=1 << 30).safetensors

    def __repr__(self) -> str:  # failing examples print their arguments
        return f"<trunk server at {self.trunk.address}>"

    def close(self) -> None:
        self.canary.close_session_quietly()
        self.canary.close()
        self.channel.close()

    # ---------------------------------------------------------------- calls

    def stream(self, method, messages):
        return outcome(lambda: list(method(iter(messages), timeout=DEADLINE_S, metadata=self.metadata)))

    def unary(self, method, request):
        return outcome(lambda: method(request, timeout=DEADLINE_S, metadata=self.metadata))

    def import_state(self, messages: list):
        return outcome(lambda: self.stub.ImportState(iter(messages), timeout=DEADLINE_S, metadata=self.metadata))

    def export(self, session_id: str):
        return outcome(lambda: list(self.stub.ExportState(pb.ExportStateRequest(session_id=session_id),
                                                          timeout=DEADLINE_S, metadata=self.metadata)))

    @contextmanager
    def session(self, role: str, encoding: str = "fp32"):
        """A new session for ``role`` ("train", "frozen": no LoRA, "inference"); closed at the end.

        Other roles get an id that names no session: a closed one, a random one, or any text.
        """
        if role not in ("train", "frozen", "inference"):
            yield role
            return
        request = pb.OpenSessionRequest(wire_encoding=encoding, mode=pb.SESSION_MODE_INFERENCE
                                        if role == "inference" else pb.SESSION_MODE_TRAIN)
        if role != "frozen":
            request.lora.CopyFrom(LORA_SPEC)
        code, reply, details = self.unary(self.stub.OpenSession, request)
        assert code == Code.OK, details
        try:
            yield reply.session_id
        finally:
            self.unary(self.stub.CloseSession, pb.CloseSessionRequest(session_id=reply.session_id))

    def forward(self, session_id: str, step: int, micro: int, batch: int, seq: int, past: int = 0) -> None:
        """A valid Forward (for inference, ``past`` positions are in the cache already)."""
        hidden, _, _ = inputs(seed=step * 7 + micro, batch=batch, seq=seq)
        request = pb.ForwardRequest(session_id=session_id, step=step, micro_batch=micro,
                                    hidden=encode_tensor(hidden),
                                    attention_mask=encode_mask(torch.ones(batch, past + seq, dtype=torch.long)))
        code, _, details = self.stream(self.stub.Forward, [request])
        assert code == Code.OK, f"a valid Forward failed: {code.name}: {details}"

    def backward(self, session_id: str, step: int, micro: int, batch: int, seq: int) -> None:
        _, _, grad = inputs(seed=step * 7 + micro, batch=batch, seq=seq)
        request = pb.BackwardRequest(session_id=session_id, step=step, micro_batch=micro,
                                     grad_output=encode_tensor(grad))
        code, _, details = self.stream(self.stub.Backward, [request])
        assert code == Code.OK, f"a valid Backward failed: {code.name}: {details}"

    # ---------------------------------------------------------------- the server is still fine

    def canary_forward(self) -> torch.Tensor:
        """A training Forward then a Step with lr 0 (which changes nothing) in the canary session."""
        self.canary_step += 1
        output = self.canary.forward(self.canary_step, 0, *self.canary_input)
        assert self.canary.step(self.canary_step, lr=0.0) == self.canary_step
        return output

    def check_alive(self) -> None:
        info = self.stub.Info(pb.InfoRequest(), timeout=DEADLINE_S, metadata=self.metadata)
        assert info.hidden_size == HIDDEN and info.active_sessions == 1, info  # every example closed its own
        assert torch.equal(self.canary_forward(), self.canary_output), "the canary session's output changed"


@pytest.fixture(scope="module")
def fuzz(tiny_dirs, tmp_path_factory):
    process = start_trunk(tiny_dirs["llama"], tmp_path_factory.mktemp("fuzz-trunk-logs"), "--max-sessions", "4",
                          "--max-saved-graphs", "2", "--max-message-mb", "1")
    try:
        fuzzing = Fuzzing(process)
        yield fuzzing
        fuzzing.close()
    finally:
        process.stop()
        # Anything the servicer did not map to a status is logged with a traceback.
        log = process.log()
        at = log.find("internal error")
        assert at < 0, log[at:at + 4000]


# ---------------------------------------------------------------- strategies: requests

steps = st.integers(INT64_MIN, INT64_MAX) | st.integers(-2, 6)
micro_batches = st.integers(0, UINT32_MAX) | st.integers(0, 3)
# The server's default budget of micro-batch indices per step: a training Forward beyond it is refused.
MAX_MICRO_BATCHES = 64
wild_floats = st.floats() | st.sampled_from(
    [0.0, -0.0, 1e-3, 1.0, 1.5, 1e30, 3.4e38, 1e300, -1.0, math.nan, math.inf, -math.inf])


class Faults:
    """Which parts of a request an example breaks: none (a valid call), one, or several.

    Valid calls reach the code behind the checks; one fault at a time reaches every check.
    """

    def __init__(self, data, parts: tuple[str, ...]) -> None:
        choice = data.draw(st.sampled_from([None, None, *parts, "several"]), label="fault")
        self.broken = {part for part in parts if part == choice or (
            choice == "several" and data.draw(st.booleans(), label=f"break {part}"))}

    def __contains__(self, part: str) -> bool:
        return part in self.broken


def draw_role(data, faults: Faults, roles=("train", "frozen", "inference")) -> str:
    """A session role for ``Fuzzing.session``; with a session fault maybe an id that names none."""
    if "session" not in faults:
        return data.draw(st.sampled_from(roles), label="session")
    return data.draw(st.sampled_from(["train", "inference", secrets.token_hex(16), ""]) | st.text(max_size=80),
                     label="session")


def draw_shape(data, faults: Faults) -> tuple[int, int]:
    """(batch, seq); empty ones only with a shape fault."""
    low = 0 if "shape" in faults else 1
    return data.draw(st.integers(low, 3), label="batch"), data.draw(st.integers(low, 5), label="seq")


def draw_tensor(data, shape: tuple[int, ...], faults: Faults, name: str) -> pb.Tensor | None:
    if "tensor" in faults:
        return data.draw(st.none() | tensors(shape), label=name)
    return data.draw(valid_tensors(shape, special=False, masks=False), label=name)


def draw_mask(data, batch: int, length: int, faults: Faults) -> pb.Tensor | None:
    choice = "fits"
    if "mask" in faults:
        choice = data.draw(st.sampled_from(["fits", "other length", "tensor", "none"]), label="mask")
    if choice == "none":
        return None
    if choice == "tensor":
        return data.draw(tensors((batch, length)), label="mask tensor")
    if choice == "other length":
        length = data.draw(st.integers(0, length + 3), label="mask length")
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32), label="mask seed"))
    mask = torch.randint(0, 2, (batch, length), generator=generator)
    if length and (choice == "fits" or data.draw(st.booleans(), label="mask ends with ones")):
        mask[:, -1] = 1  # padding on the left only, as the clients send it
    return encode_mask(mask)


def draw_stream(data, request, faults: Faults) -> list:
    """The request as a client would stream it, or (with a stream fault) a broken stream."""
    choices = ["whole", "chunked"] + (["empty", "extra pieces", "reversed"] if "stream" in faults else [])
    choice = data.draw(st.sampled_from(choices), label="stream")
    if choice == "empty":
        return []
    chunks = list(split_message(request, data.draw(st.integers(256, 4096), label="chunk bytes")))
    if choice == "chunked":
        return chunks
    if choice == "reversed":
        return chunks[::-1]
    if choice == "extra pieces":
        extra = type(request)()
        for descriptor in extra.DESCRIPTOR.fields:
            if descriptor.message_type is not None and descriptor.message_type.name == "Tensor":
                getattr(extra, descriptor.name).data = data.draw(st.binary(max_size=64), label="extra data")
            elif descriptor.type == descriptor.TYPE_BYTES:
                setattr(extra, descriptor.name, data.draw(st.binary(max_size=64), label="extra bytes"))
        return chunks + [extra]
    return [request]


def set_tensor(request, name: str, tensor: pb.Tensor | None) -> None:
    if tensor is not None:
        getattr(request, name).CopyFrom(tensor)


FUZZ_SETTINGS = dict(suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- the RPCs, one at a time


@settings(max_examples=examples(100), **FUZZ_SETTINGS)
@given(data=st.data())
def test_fuzzed_forward_requests_get_a_proper_status(fuzz, data):
    faults = Faults(data, ("session", "step", "shape", "tensor", "mask", "stream"))
    role = draw_role(data, faults, roles=("train", "frozen"))
    batch, seq = draw_shape(data, faults)
    evaluate = data.draw(st.integers(0, 4), label="evaluate") == 0
    earlier = data.draw(st.integers(0, 2), label="earlier calls") if role in ("train", "frozen") else 0
    with fuzz.session(role, data.draw(st.sampled_from(FLOAT_ENCODINGS), label="encoding")) as session_id:
        for micro in range(earlier):
            fuzz.forward(session_id, 1, micro, 2, 3)
        request = pb.ForwardRequest(session_id=session_id, evaluate=evaluate,
                                    step=data.draw(steps, label="step") if "step" in faults else 1,
                                    micro_batch=data.draw(micro_batches, label="micro-batch"))
        # A retry gets the reply of the first call, whatever this one holds.
        retry = not evaluate and request.step == 1 and request.micro_batch < earlier
        set_tensor(request, "hidden", draw_tensor(data, (batch, seq, HIDDEN), faults, "hidden"))
        set_tensor(request, "attention_mask", draw_mask(data, batch, seq, faults))
        within_budget = evaluate or request.micro_batch < MAX_MICRO_BATCHES
        check_forward(fuzz, data, request, faults, valid=not faults.broken and within_budget, retry=retry)
    fuzz.check_alive()


def check_forward(fuzz, data, request, faults, valid: bool, retry: bool) -> None:
    """Send a (maybe broken) Forward: a proper status; a valid one answers OK with the request's shape."""
    code, replies, details = fuzz.stream(fuzz.stub.Forward, draw_stream(data, request, faults))
    assert_proper(code, details)
    if valid:
        assert code == Code.OK, f"a valid Forward failed: {code.name}: {details}"
    if code == Code.OK and not retry:
        reply = join_messages(replies, max_total_bytes=1 << 30)
        assert list(reply.hidden.shape) == list(request.hidden.shape)


@settings(max_examples=examples(120), **FUZZ_SETTINGS)
@given(data=st.data())
def test_fuzzed_inference_forwards_get_a_proper_status(fuzz, data):
    """Calls that fill a KV cache, then one that fits it, retries the last, or breaks it somehow."""
    faults = Faults(data, ("step", "rows", "empty", "positions", "tensor", "stream"))
    rows = data.draw(st.integers(1, 3), label="rows")
    earlier = data.draw(st.sampled_from([1, 2, 3, 0]), label="earlier calls")  # mostly a cache to fit
    with fuzz.session("inference", data.draw(st.sampled_from(FLOAT_ENCODINGS), label="encoding")) as session_id:
        past = 0
        for number in range(earlier):
            length = data.draw(st.integers(1, 4), label="cached length")
            fuzz.forward(session_id, number, 0, rows, length, past=past)
            past += length
        step = earlier - (earlier > 0 and data.draw(st.integers(0, 3), label="retry") == 0)
        if "step" in faults:
            step = data.draw(steps, label="step")
        retry = earlier > 0 and step == earlier - 1  # answered with the reply of the first call
        batch, seq = rows, data.draw(st.integers(1, 4), label="seq")
        if "rows" in faults:  # rows the cache does not hold
            batch = data.draw(st.sampled_from([n for n in (1, 2, 3) if n != rows]), label="other rows")
        if "empty" in faults:
            batch, seq = data.draw(st.sampled_from([(0, seq), (batch, 0), (0, 0)]), label="empty")
        mask_length = past + seq
        if "positions" in faults:
            mask_length = data.draw(st.integers(0, mask_length + 3).filter(lambda n: n != past + seq),
                                    label="mask length")
        request = pb.ForwardRequest(session_id=session_id, step=step,
                                    evaluate=data.draw(st.integers(0, 7), label="evaluate") == 0)
        set_tensor(request, "hidden", draw_tensor(data, (batch, seq, HIDDEN), faults, "hidden"))
        set_tensor(request, "attention_mask", draw_mask(data, batch, mask_length, faults))
        check_forward(fuzz, data, request, faults, valid=not faults.broken and not request.evaluate, retry=retry)
    fuzz.check_alive()


@settings(max_examples=examples(80), **FUZZ_SETTINGS)
@given(data=st.data())
def test_fuzzed_backward_requests_get_a_proper_status(fuzz, data):
    faults = Faults(data, ("session", "step", "shape", "tensor", "mask", "stream"))
    role = draw_role(data, faults, roles=("train", "frozen"))
    batch, seq = draw_shape(data, faults)
    forwarded = role in ("train", "frozen") and data.draw(st.booleans(), label="after a forward")
    with fuzz.session(role) as session_id:
        if forwarded:
            fuzz.forward(session_id, 1, 0, 2, 3)
        request = pb.BackwardRequest(session_id=session_id,
                                     step=data.draw(steps, label="step") if "step" in faults else 1,
                                     micro_batch=data.draw(micro_batches, label="micro") if "step" in faults else 0)
        grad_shape = (2, 3, HIDDEN) if forwarded and "shape" not in faults else (batch, seq, HIDDEN)
        set_tensor(request, "grad_output", draw_tensor(data, grad_shape, faults, "grad"))
        resend = not forwarded or data.draw(st.booleans(), label="resend inputs")
        if resend:
            set_tensor(request, "hidden", draw_tensor(data, grad_shape, faults, "hidden"))
            set_tensor(request, "attention_mask", draw_mask(data, grad_shape[0], grad_shape[1], faults))
        code, replies, details = fuzz.stream(fuzz.stub.Backward, draw_stream(data, request, faults))
        assert_proper(code, details)
        if not faults.broken:
            assert code == Code.OK, f"a valid Backward failed: {code.name}: {details}"
        if code == Code.OK:
            reply = join_messages(replies, max_total_bytes=1 << 30)
            assert list(reply.grad_input.shape) == list(grad_shape)
            assert reply.trunk_grad_sq_norm >= 0 or math.isnan(reply.trunk_grad_sq_norm)
    fuzz.check_alive()


@settings(max_examples=examples(80), **FUZZ_SETTINGS)
@given(data=st.data())
def test_fuzzed_step_requests_get_a_proper_status(fuzz, data):
    faults = Faults(data, ("session", "step", "lr", "clip"))
    role = draw_role(data, faults, roles=("train", "frozen"))
    with fuzz.session(role) as session_id:
        if role in ("train", "frozen") and data.draw(st.booleans(), label="after a backward"):
            fuzz.forward(session_id, 1, 0, 2, 3)
            fuzz.backward(session_id, 1, 0, 2, 3)
        request = pb.StepRequest(
            session_id=session_id, step=data.draw(steps, label="step") if "step" in faults else 1,
            lr=data.draw(wild_floats if "lr" in faults else st.sampled_from([0.0, 1e-4, 1e-3]), label="lr"),
            clip_coef=data.draw(wild_floats if "clip" in faults else st.sampled_from([1.0, 0.5, 1e-3]), label="clip"))
        for _ in range(2):  # the second is a retry: it answers the same and applies nothing
            code, reply, details = fuzz.unary(fuzz.stub.Step, request)
            assert_proper(code, details)
            if not faults.broken:
                assert code == Code.OK, f"a valid Step failed: {code.name}: {details}"
            if code == Code.OK:
                assert math.isfinite(request.lr) and request.lr >= 0 and 0 < request.clip_coef <= 1
                assert reply.applied_step == max(request.step, 0)
    fuzz.check_alive()


valid_lora_specs = st.builds(
    pb.LoraSpec, r=st.integers(1, 8), alpha=st.sampled_from([1.0, 8.0, 16.0]), dropout=st.sampled_from([0.0, 0.1]),
    seed=st.integers(INT64_MIN, INT64_MAX), use_dora=st.booleans(), use_rslora=st.booleans(),
    target_modules=st.lists(st.sampled_from(["q_proj", "v_proj", "down_proj"]), max_size=2),
)
wild_lora_specs = st.builds(
    pb.LoraSpec, r=st.integers(0, 16) | st.sampled_from([4096, 4097, UINT32_MAX]), alpha=wild_floats,
    dropout=wild_floats, seed=st.integers(INT64_MIN, INT64_MAX), use_dora=st.booleans(), use_rslora=st.booleans(),
    target_modules=st.lists(st.sampled_from(["q_proj", "v_proj", "down_proj", "c_attn", "lm_head", ""])
                            | st.text(max_size=10), max_size=3),
)
wild_optimizer_specs = st.builds(pb.OptimizerSpec, beta1=wild_floats, beta2=wild_floats, eps=wild_floats,
                                 weight_decay=wild_floats)


@settings(max_examples=examples(80), **FUZZ_SETTINGS)
@given(data=st.data())
def test_fuzzed_open_session_requests_get_a_proper_status(fuzz, data):
    faults = Faults(data, ("mode", "lora", "optimizer", "encoding"))
    mode = data.draw(st.integers(-3, 5) if "mode" in faults else st.sampled_from(
        [pb.SESSION_MODE_TRAIN, pb.SESSION_MODE_INFERENCE]), label="mode")
    request = pb.OpenSessionRequest(
        mode=mode, client_label=data.draw(st.text(max_size=300), label="label"),
        wire_encoding=data.draw(encodings if "encoding" in faults else st.sampled_from(("", *FLOAT_ENCODINGS)),
                                label="encoding"))
    if "dropout_seed" in pb.OpenSessionRequest.DESCRIPTOR.fields_by_name:
        request.dropout_seed = data.draw(st.integers(INT64_MIN, INT64_MAX), label="dropout seed")
    lora = data.draw(st.none() | (wild_lora_specs if "lora" in faults else valid_lora_specs), label="lora")
    if lora is not None:
        request.lora.CopyFrom(lora)
    if "optimizer" in faults:
        request.optimizer.CopyFrom(data.draw(wild_optimizer_specs, label="optimizer"))
    code, reply, details = fuzz.unary(fuzz.stub.OpenSession, request)
    assert_proper(code, details)
    if not faults.broken:
        assert code == Code.OK, f"a valid OpenSession failed: {code.name}: {details}"
    if code == Code.OK:
        assert mode in (pb.SESSION_MODE_TRAIN, pb.SESSION_MODE_INFERENCE), "an unknown session mode was accepted"
        assert reply.session_id and reply.info.hidden_size == HIDDEN
        code, _, details = fuzz.unary(fuzz.stub.CloseSession, pb.CloseSessionRequest(session_id=reply.session_id))
        assert code == Code.OK, details
    fuzz.check_alive()


@st.composite
def edited_states(draw, state: bytes) -> bytes:
    """A trunk state file with entries dropped, added, retyped, reshaped or filled with NaN."""
    tensors_by_name = dict(load_safetensors(state))
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(sorted(tensors_by_name))) if tensors_by_name else None
        edit = draw(st.sampled_from(["drop", "add", "dtype", "shape", "nan", "step count"]))
        if edit == "step count":  # the optimizer's step count of one parameter: a shape or value AdamW cannot use
            counts = sorted(key for key in tensors_by_name if key.endswith(".step"))
            if counts:
                tensors_by_name[draw(st.sampled_from(counts))] = draw(st.sampled_from(
                    [torch.zeros(2), torch.zeros(0), torch.tensor(-3.0), torch.tensor(math.nan),
                     torch.tensor(math.inf), torch.tensor(True), torch.tensor([[7.0]])]))
        elif edit == "add" or name is None:
            prefix = draw(st.sampled_from(["adapter.", "optimizer.", "", "other."]))
            key = prefix + draw(st.sampled_from(sorted(tensors_by_name) or ["x"])).split(".", 1)[-1]
            tensors_by_name[draw(st.sampled_from([key, key + ".extra", prefix + "step"]))] = torch.zeros(2)
        elif edit == "drop":
            del tensors_by_name[name]
        elif edit == "dtype":
            dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8,
                                          torch.uint8, torch.bool]))
            tensors_by_name[name] = tensors_by_name[name].to(dtype)
        elif edit == "shape":
            value = tensors_by_name[name].reshape(-1)
            tensors_by_name[name] = draw(st.sampled_from([value, value[:1], value[:0], value.reshape(1, -1),
                                                          torch.cat([value, value]), torch.tensor(1.0)]))
        elif edit == "nan" and tensors_by_name[name].is_floating_point():
            tensors_by_name[name] = torch.full_like(tensors_by_name[name], draw(st.sampled_from(SPECIAL_FLOATS)))
    return save_safetensors({k: v.contiguous() for k, v in tensors_by_name.items()})


@settings(max_examples=examples(80), **FUZZ_SETTINGS)
@given(data=st.data())
def test_fuzzed_state_import_and_export_get_a_proper_status(fuzz, data):
    faults = Faults(data, ("session", "step", "state", "stream"))
    role = draw_role(data, faults)
    with fuzz.session(role) as session_id:
        code, replies, details = fuzz.export(session_id)
        assert_proper(code, details)
        if code == Code.OK:
            load_safetensors(join_messages(replies, max_total_bytes=1 << 30).safetensors)
        state = fuzz.state
        if "state" in faults:
            state = data.draw(st.one_of(edited_states(fuzz.state), st.binary(max_size=256),
                                        mutated(fuzz.state, proto_bytes, max_huge=64)), label="state")
        step = data.draw(steps if "step" in faults else st.integers(0, 100), label="step")
        request = pb.ImportStateRequest(session_id=session_id, step=step, safetensors=state)
        code, reply, details = fuzz.import_state(draw_stream(data, request, faults))
        assert_proper(code, details)
        if not faults.broken and role == "train":
            assert code == Code.OK, f"importing an exported state failed: {code.name}: {details}"
        if code == Code.OK and role in ("train", "frozen") and step < INT64_MAX:
            assert reply.step == step >= 0
            # Whatever was imported, a training step on it ends with proper statuses.
            hidden, mask, grad = inputs(seed=5)
            forward = pb.ForwardRequest(session_id=session_id, step=step + 1, hidden=encode_tensor(hidden),
                                        attention_mask=encode_mask(mask))
            backward = pb.BackwardRequest(session_id=session_id, step=step + 1, grad_output=encode_tensor(grad),
                                          hidden=forward.hidden, attention_mask=forward.attention_mask)
            for method, message in ((fuzz.stub.Forward, forward), (fuzz.stub.Backward, backward)):
                assert_proper(*fuzz.stream(method, [message])[::2])
            assert_proper(*fuzz.unary(fuzz.stub.Step, pb.StepRequest(session_id=session_id, step=step + 1, lr=1e-3,
                                                                     clip_coef=1.0))[::2])
    fuzz.check_alive()


@settings(max_examples=examples(20), **FUZZ_SETTINGS)
@given(session_id=st.text(max_size=80))
def test_closing_unknown_sessions_is_not_found(fuzz, session_id):
    code, _, details = fuzz.unary(fuzz.stub.CloseSession, pb.CloseSessionRequest(session_id=session_id))
    assert code == Code.NOT_FOUND, (code, details)
    fuzz.check_alive()


# ---------------------------------------------------------------- raw bytes on every method

METHODS = {  # method -> (request, response) cardinality
    "Info": ("unary", "unary"), "OpenSession": ("unary", "unary"), "Forward": ("stream", "stream"),
    "Backward": ("stream", "stream"), "Step": ("unary", "unary"), "ExportState": ("unary", "stream"),
    "ImportState": ("stream", "unary"), "CloseSession": ("unary", "unary"),
}


def valid_request(method: str, session_id: str, state: bytes) -> bytes:
    """A well-formed request of ``method`` in a new training session."""
    hidden, mask, grad = inputs(seed=6, batch=1, seq=3)
    requests = {
        "Info": pb.InfoRequest(),
        "OpenSession": pb.OpenSessionRequest(mode=pb.SESSION_MODE_TRAIN, wire_encoding="fp32"),
        "Forward": pb.ForwardRequest(session_id=session_id, step=1, hidden=encode_tensor(hidden),
                                     attention_mask=encode_mask(mask)),
        "Backward": pb.BackwardRequest(session_id=session_id, step=1, grad_output=encode_tensor(grad),
                                       hidden=encode_tensor(hidden), attention_mask=encode_mask(mask)),
        "Step": pb.StepRequest(session_id=session_id, step=1, lr=0.0, clip_coef=1.0),
        "ExportState": pb.ExportStateRequest(session_id=session_id),
        "ImportState": pb.ImportStateRequest(session_id=session_id, step=1, safetensors=state),
        "CloseSession": pb.CloseSessionRequest(session_id=session_id),
    }
    return requests[method].SerializeToString()


@settings(max_examples=examples(200), **FUZZ_SETTINGS)
@given(data=st.data(), method=st.sampled_from(sorted(METHODS)))
def test_raw_bytes_on_every_method_get_a_proper_status(fuzz, data, method):
    """Bytes that may not parse as the request message at all, sent with identity serializers."""
    requests_in, responses_out = METHODS[method]
    path = f"/splitlearn.trunk.v1.Trunk/{method}"
    call = getattr(fuzz.channel, f"{requests_in}_{responses_out}")(path, request_serializer=None,
                                                                   response_deserializer=None)
    with fuzz.session("train") as session_id:
        valid = valid_request(method, session_id, fuzz.state)
        payloads = data.draw(st.lists(st.binary(max_size=200) | mutated(valid, proto_bytes, max_huge=64),
                                      min_size=1, max_size=3 if requests_in == "stream" else 1), label="payloads")

        def send():
            reply = call(iter(payloads) if requests_in == "stream" else payloads[0], timeout=DEADLINE_S,
                         metadata=fuzz.metadata)
            return list(reply) if responses_out == "stream" else reply

        code, reply, details = outcome(send)
        assert_proper(code, details)
        if code == Code.OK and method == "OpenSession":
            opened = pb.OpenSessionResponse.FromString(reply)
            fuzz.unary(fuzz.stub.CloseSession, pb.CloseSessionRequest(session_id=opened.session_id))
    fuzz.check_alive()


# ---------------------------------------------------------------- what the fuzzing found, pinned down


def test_wire_regressions_found_by_fuzzing():
    too_big_for_fp16 = encode_tensor(torch.tensor([70000.0]))
    too_big_for_fp16.dtype = "float16"
    huge_scale = encode_tensor(torch.ones(4), "int8")
    huge_scale.scales = torch.tensor([3e38], dtype=torch.float32).numpy().tobytes()
    absurd_but_empty = pb.Tensor(dtype="float32", shape=[0, 2**62, 4], encoding="fp32")
    cases = [(too_big_for_fp16, DEFAULT_MAX_ELEMENTS, "beyond the range of float16"),
             (huge_scale, DEFAULT_MAX_ELEMENTS, "NaN or infinite"),
             (absurd_but_empty, DEFAULT_MAX_ELEMENTS, "exceeds the limit"),
             (pb.Tensor(dtype="float32", encoding="fp32", data=b"\0" * 4), 0, "exceeds the limit of 0 values")]
    for message, max_elements, reason in cases:
        with pytest.raises(WireError, match=reason):
            decode_tensor(message, max_elements=max_elements)


def test_server_regressions_found_by_fuzzing(fuzz):
    """Each of these once ended with INTERNAL (or was accepted); now INVALID_ARGUMENT with a reason."""
    hidden, mask, grad = inputs(seed=8, batch=2, seq=3)

    def forward(session_id, step=1, hidden=hidden, mask=mask):
        return pb.ForwardRequest(session_id=session_id, step=step, hidden=encode_tensor(hidden),
                                 attention_mask=encode_mask(mask))

    def refused(result, reason):
        code, _, details = result
        assert (code, reason in details) == (Code.INVALID_ARGUMENT, True), (code, details)

    garbage = fuzz.channel.stream_stream("/splitlearn.trunk.v1.Trunk/Forward", request_serializer=None,
                                         response_deserializer=None)
    refused(outcome(lambda: list(garbage(iter([b"\xff\xff"]), timeout=DEADLINE_S, metadata=fuzz.metadata))),
            "is not a valid Forward request")
    refused(fuzz.unary(fuzz.stub.OpenSession, pb.OpenSessionRequest(mode=7)), "mode must be")
    with fuzz.session("train") as session_id:
        refused(fuzz.stream(fuzz.stub.Forward, [forward(session_id, hidden=hidden[:, :0], mask=mask[:, :0])]),
                "is empty")
        longer_mask = torch.ones(2, 5, dtype=torch.long)
        refused(fuzz.stream(fuzz.stub.Backward, [pb.BackwardRequest(
            session_id=session_id, step=1, grad_output=encode_tensor(grad), hidden=encode_tensor(hidden),
            attention_mask=encode_mask(longer_mask))]), "attention_mask must be (2, 3)")
        fuzz.forward(session_id, 1, 0, 2, 3)
        fuzz.backward(session_id, 1, 0, 2, 3)
        refused(fuzz.unary(fuzz.stub.Step, pb.StepRequest(session_id=session_id, step=1, lr=1e30, clip_coef=1)),
                "lr must be a finite number in [0, 1]")
        state = dict(load_safetensors(fuzz.state))
        state[next(key for key in sorted(state) if key.endswith(".step"))] = torch.zeros(2)
        refused(fuzz.import_state([pb.ImportStateRequest(session_id=session_id, step=1,
                                                         safetensors=save_safetensors(state))]),
                "step must be one finite number >= 0")
    with fuzz.session("inference") as session_id:
        fuzz.forward(session_id, 0, 0, 2, 3)
        refused(fuzz.stream(fuzz.stub.Forward, [forward(session_id, step=1, hidden=hidden[:1, :1],
                                                        mask=torch.ones(1, 4, dtype=torch.long))]),
                "this session's KV cache holds 2")
    fuzz.check_alive()
