"""Tensors on the wire: explicit dtype, shape, encoding and bytes; never pickle.

Float tensors (hidden states, gradients) travel as ``fp32``, ``bf16``, ``fp16`` (scaled
per tensor, see ``_fp16_scale``) or ``int8`` (blockwise absmax: one float32 scale per block
of values). Attention masks travel as ``u8``. Decoding validates everything (encoding, dtype, shape, byte counts,
a size limit) *before* allocating, and raises ``WireError`` with the reason.

Messages that carry tensors are streamed: ``split_message`` cuts the tensors' bytes
into chunks spread over several messages of the same type and ``join_messages``
puts them back, refusing streams that grow beyond what the first message announced.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
from google.protobuf.message import Message

from splitcore.remote.proto import trunk_pb2 as pb

FLOAT_ENCODINGS = ("fp32", "bf16", "fp16", "int8")
MASK_ENCODING = "u8"
INT8_BLOCK_SIZE = 64
DEFAULT_CHUNK_BYTES = 1 << 20
# Nothing this service exchanges comes near this; it stops absurd sizes before allocation.
DEFAULT_MAX_ELEMENTS = 1 << 28
# fp16 scales each tensor so its largest finite magnitude lands in [2**13, 2**14): well inside
# fp16's normal range (max 65504), so small gradients keep fp16's ~1e-3 relative precision.
FP16_TARGET_EXPONENT = 14
# The scale is a power of two 2**k that is a normal float32, so scaling is exact both ways.
_FP16_SCALE_EXPONENTS = (-126, 127)
# How a scaled fp16 tensor is tagged on the wire (a session's encoding is still "fp16"). A peer from
# before the scale refuses the tag as an unknown encoding, rather than reading the values 2**k off;
# its own plain "fp16" tensors (no scale) still decode here.
FP16_SCALED = "fp16-scaled"

_BYTES_PER_VALUE = {"fp32": 4, "bf16": 2, "fp16": 2, FP16_SCALED: 2, "int8": 1, MASK_ENCODING: 1}
_TORCH_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
}
_DTYPE_NAMES = {v: k for k, v in _TORCH_DTYPES.items()}
_ENCODED_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class WireError(ValueError):
    """A tensor or message on the wire is malformed; the text says what and where."""


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        raise WireError(f"dtype {dtype} cannot be sent; supported: {', '.join(_TORCH_DTYPES)}")
    return _DTYPE_NAMES[dtype]


def check_encoding(encoding: str) -> str:
    if encoding not in FLOAT_ENCODINGS:
        raise WireError(f"unknown wire encoding {encoding!r}; choose one of {', '.join(FLOAT_ENCODINGS)}")
    return encoding


def encode_tensor(tensor: torch.Tensor, encoding: str = "fp32") -> pb.Tensor:
    """A float tensor -> protobuf Tensor in the given encoding."""
    check_encoding(encoding)
    if not tensor.is_floating_point():
        raise WireError(f"encoding {encoding} is for float tensors, got {tensor.dtype}")
    values = tensor.detach().to("cpu").contiguous()
    message = pb.Tensor(dtype=dtype_name(values.dtype), shape=list(values.shape), encoding=encoding)
    if encoding == "int8":
        quantised, scales = _quantise_int8(values.float().reshape(-1), INT8_BLOCK_SIZE)
        message.data = quantised.numpy().tobytes()
        message.scales = scales.numpy().tobytes()
        message.block_size = INT8_BLOCK_SIZE
    elif encoding == "fp16":
        scale = _fp16_scale(values)
        message.encoding = FP16_SCALED
        message.data = _raw_bytes((values.float() * scale).to(torch.float16))
        message.scales = struct.pack("<f", scale)
    else:
        message.data = _raw_bytes(values.to(_ENCODED_DTYPE[encoding]))
    return message


def encode_mask(mask: torch.Tensor) -> pb.Tensor:
    """A 0/1 attention mask (batch, seq) -> protobuf Tensor, one byte per value."""
    values = mask.detach().to("cpu").contiguous()
    if values.numel() and not bool(((values == 0) | (values == 1)).all()):
        raise WireError("an attention mask may only hold 0 and 1")
    return pb.Tensor(dtype="int64", shape=list(values.shape), encoding=MASK_ENCODING,
                     data=values.to(torch.uint8).numpy().tobytes())


def decode_tensor(
    message: pb.Tensor,
    field: str = "tensor",
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    expected_shape: tuple[int | None, ...] | None = None,
) -> torch.Tensor:
    """Protobuf Tensor -> torch tensor in its original dtype; ``WireError`` when malformed.

    ``expected_shape`` may use ``None`` for free dimensions; ``field`` names the tensor
    in error messages.
    """
    shape = _checked_shape(message, field, max_elements, expected_shape)
    count = math.prod(shape)
    encoding = message.encoding
    if encoding not in _BYTES_PER_VALUE:
        raise WireError(f"{field}: unknown encoding {encoding!r}; expected one of "
                        f"{', '.join(FLOAT_ENCODINGS + (FP16_SCALED, MASK_ENCODING))}")
    if message.dtype not in _TORCH_DTYPES:
        raise WireError(f"{field}: unknown dtype {message.dtype!r}; expected one of {', '.join(_TORCH_DTYPES)}")
    dtype = _TORCH_DTYPES[message.dtype]
    if (encoding == MASK_ENCODING) != (dtype == torch.int64):
        raise WireError(f"{field}: encoding {encoding} cannot carry dtype {message.dtype}")
    expected_bytes = count * _BYTES_PER_VALUE[encoding]
    if len(message.data) != expected_bytes:
        raise WireError(f"{field}: {len(message.data)} data bytes do not match shape {list(shape)} "
                        f"in {encoding} ({expected_bytes} bytes expected)")
    if encoding == MASK_ENCODING:
        values = torch.frombuffer(bytearray(message.data), dtype=torch.uint8) if count else torch.empty(0)
        if count and bool((values > 1).any()):
            raise WireError(f"{field}: an attention mask may only hold 0 and 1")
        return values.to(torch.int64).reshape(shape)
    if encoding == "int8":
        values = _dequantise_int8(message, field, count).to(dtype)
    elif count == 0:
        if encoding in ("fp16", FP16_SCALED):
            _fp16_scale_of(message, field)
        values = torch.empty(0, dtype=dtype)
    elif encoding in ("fp16", FP16_SCALED):
        scale = _fp16_scale_of(message, field)
        values = (torch.frombuffer(bytearray(message.data), dtype=torch.float16).float() / scale).to(dtype)
    else:
        values = torch.frombuffer(bytearray(message.data), dtype=_ENCODED_DTYPE[encoding]).to(dtype)
    # Checked after the cast: a finite value beyond the declared dtype's range (65536 as float16,
    # or an int8 value times a huge scale) turns infinite there.
    if not bool(torch.isfinite(values).all()):
        raise WireError(f"{field}: holds NaN or infinite values (or values beyond the range of {message.dtype})")
    return values.reshape(shape)


def encoded_size(message: pb.Tensor) -> int:
    return len(message.data) + len(message.scales)


def encoded_bytes(count: int, encoding: str) -> int:
    """Bytes ``count`` float values take on the wire in ``encoding`` (int8: with its per-block scales),
    known without encoding them."""
    check_encoding(encoding)
    scales = 4 * -(-count // INT8_BLOCK_SIZE) if encoding == "int8" else 4 if encoding == "fp16" else 0
    return count * _BYTES_PER_VALUE[encoding] + scales


def _checked_shape(message: pb.Tensor, field: str, max_elements: int,
                   expected_shape: tuple[int | None, ...] | None) -> tuple[int, ...]:
    shape = tuple(int(d) for d in message.shape)
    if any(d < 0 for d in shape):
        raise WireError(f"{field}: negative dimension in shape {list(shape)}")
    if len(shape) > 8:
        raise WireError(f"{field}: {len(shape)} dimensions is too many")
    # Empty dimensions count as 1: with one, a tensor holds no values, but absurd other
    # dimensions still overflow its strides. The extra 1 checks a scalar (one value) too.
    count = 1
    for d in (*shape, 1):
        count *= max(d, 1)
        if count > max_elements:
            raise WireError(f"{field}: shape {list(shape)} exceeds the limit of {max_elements} values")
    if expected_shape is not None:
        matches = len(shape) == len(expected_shape) and all(
            e is None or e == d for e, d in zip(expected_shape, shape)
        )
        if not matches:
            wanted = ["*" if e is None else e for e in expected_shape]
            raise WireError(f"{field}: shape {list(shape)} does not match the expected {wanted}")
    return shape


def _raw_bytes(values: torch.Tensor) -> bytes:
    if values.dtype == torch.bfloat16:
        return values.view(torch.int16).numpy().tobytes()
    return values.numpy().tobytes()


def _fp16_scale(values: torch.Tensor) -> float:
    """The power of two that brings ``values``' largest finite magnitude into [2**13, 2**14).

    inf and NaN do not count (they stay inf and NaN when scaled); an all-zero, empty or
    all-non-finite tensor gets 1. Huge values get a scale below 1, tiny ones above 1.
    """
    magnitudes = values.detach().float().abs()
    largest = torch.where(torch.isfinite(magnitudes), magnitudes, 0.0).amax().item() if values.numel() else 0.0
    if largest == 0.0:
        return 1.0
    _, exponent = math.frexp(largest)  # largest = m * 2**exponent with 0.5 <= m < 1
    low, high = _FP16_SCALE_EXPONENTS
    return 2.0 ** min(max(FP16_TARGET_EXPONENT - exponent, low), high)


def _fp16_scale_of(message: pb.Tensor, field: str) -> float:
    """The scale an fp16 tensor was multiplied by: one float32 power of two for ``FP16_SCALED``,
    none (1) for plain ``fp16``, which is how a peer from before the scale sends."""
    if message.block_size != 0:
        raise WireError(f"{field}: fp16 block_size {message.block_size} must be 0 (one scale for the whole tensor)")
    if message.encoding == "fp16":
        if message.scales:
            raise WireError(f"{field}: plain fp16 carries no scale; a scaled tensor is tagged {FP16_SCALED!r}")
        return 1.0
    if len(message.scales) != 4:
        raise WireError(f"{field}: {len(message.scales)} scale bytes for {FP16_SCALED}, expected 4 (one float32 "
                        "scale)")
    (scale,) = struct.unpack("<f", message.scales)
    if not (math.isfinite(scale) and scale > 0 and math.frexp(scale)[0] == 0.5):
        raise WireError(f"{field}: fp16 scale {scale!r} must be a finite positive power of two")
    return scale


def _quantise_int8(flat: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = math.ceil(flat.numel() / block_size)
    padded = torch.zeros(blocks * block_size, dtype=torch.float32)
    padded[: flat.numel()] = flat
    padded = padded.view(blocks, block_size)  # (blocks, block_size)
    scales = padded.abs().amax(dim=1) / 127.0  # (blocks,)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    quantised = torch.round(padded / safe[:, None]).clamp(-127, 127).to(torch.int8)
    return quantised.reshape(-1)[: flat.numel()], scales


def _dequantise_int8(message: pb.Tensor, field: str, count: int) -> torch.Tensor:
    block_size = int(message.block_size)
    if not 1 <= block_size <= 1 << 16:
        raise WireError(f"{field}: int8 block_size {block_size} is out of range [1, 65536]")
    blocks = math.ceil(count / block_size)
    if len(message.scales) != blocks * 4:
        raise WireError(f"{field}: {len(message.scales)} scale bytes, expected {blocks * 4} "
                        f"({blocks} float32 scales for {count} values in blocks of {block_size})")
    if count == 0:
        return torch.empty(0)
    scales = torch.frombuffer(bytearray(message.scales), dtype=torch.float32)
    if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
        raise WireError(f"{field}: int8 scales must be finite and non-negative")
    quantised = torch.frombuffer(bytearray(message.data), dtype=torch.int8).to(torch.float32)
    padded = torch.zeros(blocks * block_size, dtype=torch.float32)
    padded[:count] = quantised
    return (padded.view(blocks, block_size) * scales[:, None]).reshape(-1)[:count]


# ---------------------------------------------------------------- streaming

M = TypeVar("M", bound=Message)


def _chunked_fields(message: Message) -> list[tuple[str, str]]:
    """(field, kind) for every top-level field whose bytes may be split: Tensor fields and bytes fields."""
    fields = []
    for descriptor in message.DESCRIPTOR.fields:
        if descriptor.message_type is not None and descriptor.message_type.full_name == pb.Tensor.DESCRIPTOR.full_name:
            fields.append((descriptor.name, "tensor"))
        elif descriptor.type == descriptor.TYPE_BYTES:
            fields.append((descriptor.name, "bytes"))
    return fields


def split_message(message: M, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[M]:
    """Yield ``message`` as messages of at most ~``chunk_bytes`` payload each.

    A small message goes as it is. Otherwise the first message carries every field
    with the payloads empty and each following message one slice of one payload.
    """
    if message.ByteSize() <= chunk_bytes:
        yield message
        return
    first = type(message)()
    first.CopyFrom(message)
    pieces: list[M] = []

    def slices(payload: bytes, place) -> None:
        for offset in range(0, len(payload), chunk_bytes):
            piece = type(message)()
            place(piece, payload[offset: offset + chunk_bytes])
            pieces.append(piece)

    for name, kind in _chunked_fields(message):
        if kind == "tensor":
            if not message.HasField(name):
                continue
            for attribute in ("data", "scales"):
                setattr(getattr(first, name), attribute, b"")
                slices(getattr(getattr(message, name), attribute),
                       lambda piece, chunk, n=name, a=attribute: setattr(getattr(piece, n), a, chunk))
        else:
            setattr(first, name, b"")
            slices(getattr(message, name), lambda piece, chunk, n=name: setattr(piece, n, chunk))
    yield first
    yield from pieces


def join_messages(messages: Iterable[M], max_total_bytes: int) -> M:
    """Reassemble what ``split_message`` produced; ``WireError`` on an empty or oversized stream."""
    iterator = iter(messages)
    try:
        first = next(iterator)
    except StopIteration:
        raise WireError("empty request stream") from None
    total = first.ByteSize()
    second = next(iterator, None)
    if second is None:  # the message came whole (most do): no copy
        if total > max_total_bytes:
            raise WireError(f"request stream exceeds the limit of {max_total_bytes} bytes")
        return first
    joined = type(first)()
    joined.CopyFrom(first)
    fields = _chunked_fields(first)
    parts: dict[tuple[str, str], list[bytes]] = {}
    for piece in itertools.chain((second,), iterator):
        total += piece.ByteSize()
        if total > max_total_bytes:
            raise WireError(f"request stream exceeds the limit of {max_total_bytes} bytes")
        for name, kind in fields:
            if kind == "tensor":
                if piece.HasField(name):
                    for attribute in ("data", "scales"):
                        payload = getattr(getattr(piece, name), attribute)
                        if payload:
                            parts.setdefault((name, attribute), []).append(payload)
            elif getattr(piece, name):
                parts.setdefault((name, ""), []).append(getattr(piece, name))
    if total > max_total_bytes:
        raise WireError(f"request stream exceeds the limit of {max_total_bytes} bytes")
    for (name, attribute), pieces in parts.items():
        if attribute:
            target = getattr(joined, name)
            setattr(target, attribute, getattr(target, attribute) + b"".join(pieces))
        else:
            setattr(joined, name, getattr(joined, name) + b"".join(pieces))
    return joined
