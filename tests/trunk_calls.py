"""What the trunk tests send a tiny Llama trunk: its hidden size, a LoRA, inputs, and a raw gRPC stub."""

from __future__ import annotations

import grpc
import torch

from splitcore import LoraSettings
from splitcore.remote.proto import trunk_pb2_grpc as pb_grpc

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
HIDDEN = 64


def inputs(seed=0, batch=2, seq=6):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, HIDDEN, generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :2] = 0  # a left-padded row
    grad = torch.randn(batch, seq, HIDDEN, generator=generator)
    return hidden, mask, grad


def raw_stub(trunk):
    channel = grpc.insecure_channel(trunk.address)
    return channel, pb_grpc.TrunkStub(channel), (("authorization", f"Bearer {trunk.token}"),)
