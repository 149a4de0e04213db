"""The wire format: encodings, validation before allocation, chunked streams, fresh generated code."""

from __future__ import annotations

import math
import struct

import pytest
import torch

from splitcore.remote.proto import codegen
from splitcore.remote.proto import trunk_pb2 as pb
from splitcore.remote.wire import (
    FLOAT_ENCODINGS,
    WireError,
    decode_tensor,
    encode_mask,
    encode_tensor,
    join_messages,
    split_message,
)


def test_generated_code_is_fresh():
    fresh = codegen.generate_fresh_copy()
    proto_dir = codegen.PROJECT_ROOT / codegen.PROTO_RELATIVE.parent
    for name, content in fresh.items():
        assert (proto_dir / name).read_bytes() == content, f"{name} is stale: run `make proto`"


@pytest.mark.parametrize("encoding,bytes_per_value,tolerance", [
    ("fp32", 4, 0.0), ("bf16", 2, 1e-2), ("fp16", 2, 1e-3), ("int8", 1, 2e-2),
])
def test_float_encodings_round_trip(encoding, bytes_per_value, tolerance):
    torch.manual_seed(0)
    values = torch.randn(3, 17, 40)
    message = encode_tensor(values, encoding)
    assert message.encoding == ("fp16-scaled" if encoding == "fp16" else encoding)
    assert list(message.shape) == [3, 17, 40]
    assert len(message.data) == values.numel() * bytes_per_value
    decoded = decode_tensor(message)
    assert decoded.dtype == torch.float32 and decoded.shape == values.shape
    assert (decoded - values).abs().max().item() <= tolerance * values.abs().max().item()


def test_int8_keeps_small_blocks_accurate():
    values = torch.cat([torch.full((64,), 1000.0), torch.linspace(-1e-3, 1e-3, 64)])
    decoded = decode_tensor(encode_tensor(values, "int8"))
    # Blockwise scales: the tiny block is not crushed by the large one.
    assert (decoded[64:] - values[64:]).abs().max().item() < 1e-5


@pytest.mark.parametrize("magnitude", [3e-8, 5e-7, 1e-3, 1.0, 6e4, 1e30])
def test_fp16_is_scaled_per_tensor_so_tiny_and_huge_values_keep_its_precision(magnitude):
    torch.manual_seed(0)
    values = torch.randn(4, 50) * magnitude
    values[0, 0] = magnitude  # (values near 60000 are the top of fp16's range unscaled)
    message = encode_tensor(values, "fp16")
    (scale,) = struct.unpack("<f", message.scales)
    assert message.block_size == 0 and math.frexp(scale)[0] == 0.5
    assert 2**13 <= values.abs().max().item() * scale < 2**14
    decoded = decode_tensor(message)
    relative = ((decoded - values).abs() / values.abs()).max().item()
    assert relative <= 1e-3, f"{magnitude}: {relative:.2e}"


@pytest.mark.parametrize("values", [torch.zeros(3, 5), torch.zeros(0, 5), torch.tensor(-0.0)])
def test_fp16_zero_and_empty_tensors_round_trip_with_scale_one(values):
    message = encode_tensor(values, "fp16")
    assert struct.unpack("<f", message.scales) == (1.0,)
    assert torch.equal(decode_tensor(message), values)


def test_fp16_keeps_inf_and_nan_and_scales_by_the_finite_values():
    values = torch.tensor([5e-7, -3e-8, math.inf, -math.inf, math.nan, 0.0])
    message = encode_tensor(values, "fp16")
    (scale,) = struct.unpack("<f", message.scales)
    sent = torch.frombuffer(bytearray(message.data), dtype=torch.float16).float() / scale
    assert sent[2] == math.inf and sent[3] == -math.inf and math.isnan(sent[4]) and sent[5] == 0
    assert ((sent[:2] - values[:2]).abs() / values[:2].abs()).max().item() <= 1e-3
    # As with every encoding, the receiver refuses non-finite values.
    with pytest.raises(WireError, match="grad: holds NaN or infinite values"):
        decode_tensor(message, "grad")


@pytest.mark.parametrize("scales,block_size,reason", [
    (b"\x00\x00\x80", 0, "3 scale bytes for fp16-scaled, expected 4"),
    (b"\x00" * 8, 0, "8 scale bytes for fp16-scaled, expected 4"),
    (b"", 0, "0 scale bytes for fp16-scaled, expected 4"),
    (struct.pack("<f", 0.0), 0, "fp16 scale 0.0 must be a finite positive power of two"),
    (struct.pack("<f", -2.0), 0, "fp16 scale -2.0 must be a finite positive power of two"),
    (struct.pack("<f", 3.0), 0, "fp16 scale 3.0 must be a finite positive power of two"),
    (struct.pack("<f", math.inf), 0, "fp16 scale inf must be"),
    (struct.pack("<f", math.nan), 0, "fp16 scale nan must be"),
    (struct.pack("<f", 4.0), 64, "fp16 block_size 64 must be 0"),
])
def test_fp16_bad_scales_are_refused_with_a_reason(scales, block_size, reason):
    for values in (torch.randn(2, 3), torch.zeros(0, 3)):
        message = encode_tensor(values, "fp16")
        message.scales, message.block_size = scales, block_size
        with pytest.raises(WireError, match=f"hidden: {reason}"):
            decode_tensor(message, "hidden")


def test_plain_fp16_decodes_unscaled_as_older_peers_send_it():
    values = torch.tensor([[1.5, -2.25, 1e-3], [6e4, 0.0, -7.0]])
    unscaled = pb.Tensor(dtype="float32", shape=[2, 3], encoding="fp16",
                         data=values.to(torch.float16).numpy().tobytes())
    assert torch.equal(decode_tensor(unscaled), values.to(torch.float16).float())
    unscaled.scales = struct.pack("<f", 4.0)
    with pytest.raises(WireError, match="hidden: plain fp16 carries no scale; a scaled tensor is tagged"):
        decode_tensor(unscaled, "hidden")


def test_a_scaled_tensor_carries_its_own_tag_so_an_older_peer_refuses_it_rather_than_misread_it():
    message = encode_tensor(torch.full((4,), 3e-8), "fp16")
    assert message.encoding == "fp16-scaled" and struct.unpack("<f", message.scales)[0] > 1
    # What a peer from before the scale knows: these four encodings and masks.
    older = {"fp32", "bf16", "fp16", "int8", "u8"}
    assert message.encoding not in older


def test_masks_round_trip_and_reject_other_values():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert torch.equal(decode_tensor(encode_mask(mask)), mask)
    with pytest.raises(WireError, match="may only hold 0 and 1"):
        encode_mask(torch.tensor([[2, 1]]))
    bad = pb.Tensor(dtype="int64", shape=[2], encoding="u8", data=bytes([1, 7]))
    with pytest.raises(WireError, match="mask: an attention mask may only hold 0 and 1"):
        decode_tensor(bad, "mask")


@pytest.mark.parametrize("mutate,message", [
    (lambda m: setattr(m, "encoding", "fp8"), "hidden: unknown encoding 'fp8'"),
    (lambda m: setattr(m, "dtype", "complex64"), "hidden: unknown dtype 'complex64'"),
    (lambda m: setattr(m, "data", m.data[:-1]), r"hidden: 95 data bytes do not match shape \[2, 3, 4\]"),
    (lambda m: m.shape.__setitem__(0, -2), "negative dimension"),
    (lambda m: m.shape.extend([1 << 20, 1 << 20]), "exceeds the limit"),
    (lambda m: setattr(m, "data", b"\x00\x00\xc0\x7f" * 24), "NaN or infinite"),
])
def test_malformed_tensors_are_refused_with_a_reason(mutate, message):
    tensor = encode_tensor(torch.randn(2, 3, 4))
    mutate(tensor)
    with pytest.raises(WireError, match=message):
        decode_tensor(tensor, "hidden")


def test_expected_shape_is_enforced():
    tensor = encode_tensor(torch.randn(2, 3, 4))
    assert decode_tensor(tensor, expected_shape=(None, None, 4)).shape == (2, 3, 4)
    with pytest.raises(WireError, match=r"shape \[2, 3, 4\] does not match the expected \['\*', '\*', 8\]"):
        decode_tensor(tensor, expected_shape=(None, None, 8))


def test_int8_scales_are_validated():
    tensor = encode_tensor(torch.randn(100), "int8")
    tensor.scales = tensor.scales[:-4]
    with pytest.raises(WireError, match="scale bytes"):
        decode_tensor(tensor)


def test_unknown_encoding_is_refused_when_sending():
    with pytest.raises(WireError, match="unknown wire encoding 'fp64'"):
        encode_tensor(torch.randn(2), "fp64")


@pytest.mark.parametrize("encoding", FLOAT_ENCODINGS)
def test_large_messages_stream_in_chunks_and_join_back(encoding):
    request = pb.BackwardRequest(
        session_id="abc", step=7, micro_batch=2,
        grad_output=encode_tensor(torch.randn(4, 300, 64), encoding),
        hidden=encode_tensor(torch.randn(4, 300, 64), encoding),
        attention_mask=encode_mask(torch.ones(4, 300, dtype=torch.long)),
    )
    chunks = list(split_message(request, chunk_bytes=16_384))
    assert len(chunks) > 4
    assert all(chunk.ByteSize() < 16_384 + 200 for chunk in chunks)
    assert join_messages(chunks, max_total_bytes=10**8) == request


def test_join_refuses_streams_beyond_the_limit():
    request = pb.ForwardRequest(session_id="s", hidden=encode_tensor(torch.randn(100, 100)))
    chunks = list(split_message(request, chunk_bytes=4096))
    with pytest.raises(WireError, match="exceeds the limit of 20000 bytes"):
        join_messages(chunks, max_total_bytes=20_000)
    with pytest.raises(WireError, match="empty request stream"):
        join_messages([], max_total_bytes=20_000)


def test_state_bytes_stream_in_chunks():
    payload = bytes(range(256)) * 1000
    chunks = list(split_message(pb.ExportStateResponse(step=3, safetensors=payload), chunk_bytes=10_000))
    assert len(chunks) == 27  # a header, then 26 slices of 10 000 bytes
    joined = join_messages(chunks, max_total_bytes=10**6)
    assert joined.step == 3 and joined.safetensors == payload
