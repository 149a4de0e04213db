"""Device and compute dtype: every code path a GPU trunk takes, run here on the CPU.

A bf16 trunk (``--device cpu --dtype bf16``) holds its frozen blocks in bf16 and its
adapters fp32, still matches a fp32 client's weights fingerprint, trains within a stated
tolerance of the fp32 run, and reports device, dtype and memory. Running out of device
memory, which cannot happen on demand here, is injected into the host of an in-process
server: the call answers RESOURCE_EXHAUSTED naming the session and the request size, and
the server keeps serving.
"""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest
import torch
from safetensors.torch import load_file
from training_helpers import train_cli, trunk_args
from transformers import AutoModelForCausalLM
from trunk_process import start_trunk

from splitcore import LoraSettings, split_model
from splitcore.model.devices import resolve_device
from splitcore.model.fingerprint import weights_fingerprint
from splitcore.remote.client import TrunkClient
from splitcore.remote.errors import Fault, Reason, TrunkError
from splitcore.remote.process import PROJECT_ROOT
from trunk_server.config import TrunkServerConfig
from trunk_server.host import TrunkHost
from trunk_server.server import create_server

HIDDEN = 64
# Ten steps of the arithmetic run at lr 2e-3: the bf16 trunk's losses stay within this of the fp32
# run's (measured: 4e-4 at most, with different client secrets and with the rotary frequencies in bf16).
BF16_LOSS_TOLERANCE = 0.01


@pytest.fixture(scope="module")
def bf16_trunk(tiny_dirs, tmp_path_factory):
    process = start_trunk(tiny_dirs["llama"], tmp_path_factory.mktemp("trunk-logs"), "--device", "cpu",
                          "--dtype", "bf16")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def fp32_trunk(tiny_dirs, tmp_path_factory):
    process = start_trunk(tiny_dirs["llama"], tmp_path_factory.mktemp("trunk-logs"))
    yield process
    process.stop()


def test_a_bf16_trunk_reports_its_device_dtype_and_memory_and_keeps_the_fp32_fingerprint(
        tiny_dirs, bf16_trunk, fp32_trunk):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    _, trunk_part, _ = split_model(model, 2, 2)
    with TrunkClient(bf16_trunk.address, bf16_trunk.token) as bf16, \
            TrunkClient(fp32_trunk.address, fp32_trunk.token) as fp32:
        half, full = bf16.info(), fp32.info()
        assert (half.device, half.dtype, full.device, full.dtype) == ("cpu", "bfloat16", "cpu", "float32")
        assert half.weights_fingerprint == full.weights_fingerprint == weights_fingerprint(trunk_part)
        assert half.memory_total_bytes > 0 and half.memory_total_bytes == full.memory_total_bytes
        assert half.memory_base_bytes * 2 == full.memory_base_bytes > 0
        assert half.memory_sessions_bytes == 0
        bf16.open_session(LoraSettings(r=4, alpha=8, dropout=0.0))
        hidden, mask = torch.randn(2, 8, HIDDEN), torch.ones(2, 8, dtype=torch.long)
        out = bf16.forward(1, 0, hidden, mask)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        # The adapter (fp32) and the saved graph's ends count for the session.
        assert bf16.info().memory_sessions_bytes > 0


def test_split_training_on_a_bf16_trunk_stays_close_to_fp32_and_exports_fp32_lora(
        tiny_dirs, dataset, bf16_trunk, fp32_trunk, tmp_path):
    # A gentler learning rate than the equivalence tests': at 2e-2 this run is on the edge of
    # instability, where any rounding (bf16's or another CPU's) grows from step to step.
    gentle = ("--lr", "2e-3")
    full, _ = train_cli(tiny_dirs, dataset, tmp_path / "fp32", *trunk_args(fp32_trunk), extra=gentle)
    half, _ = train_cli(tiny_dirs, dataset, tmp_path / "bf16", *trunk_args(bf16_trunk), extra=gentle)
    drift = max(abs(a["loss"] - b["loss"]) for a, b in zip(half, full, strict=True))
    assert 0 < drift <= BF16_LOSS_TOLERANCE, drift  # bf16 rounds, but not far
    assert half[-1]["loss"] < half[0]["loss"]
    weights = load_file(str(tmp_path / "bf16" / "adapter_model.safetensors"))
    trunk_keys = [k for k in weights if ".layers.2." in k or ".layers.3." in k]
    assert trunk_keys and all(weights[k].dtype == torch.float32 for k in trunk_keys)


@pytest.fixture
def in_process_server(tiny_dirs):
    config = TrunkServerConfig(model_dir=tiny_dirs["llama"], n_bottom=2, n_top=2, token="t" * 32, port=0,
                               dtype="bf16")
    host = TrunkHost(config)
    running = create_server(config, host)
    yield host, running
    running.stop(grace_s=1)


def test_running_out_of_device_memory_answers_resource_exhausted_and_frees_the_call(in_process_server,
                                                                                    monkeypatch):
    host, running = in_process_server
    real_forward = host.forward
    calls = []

    def forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(host, "forward", forward)
    with TrunkClient(f"127.0.0.1:{running.port}", "t" * 32) as client:
        reply = client.open_session(LoraSettings(r=4, alpha=8))
        hidden, mask = torch.randn(3, 7, HIDDEN), torch.ones(3, 7, dtype=torch.long)
        with pytest.raises(TrunkError) as error:
            client.forward(1, 0, hidden, mask)
        assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.value.reason == Reason.OUT_OF_MEMORY and error.value.fault == Fault.FULL
        assert f"session {reply.session_id[:8]}" in error.value.details
        assert "Forward of 3 rows x 7 positions" in error.value.details
        assert "Tried to allocate 2.00 GiB" in error.value.details
        assert "ran out of memory" in error.value.explain("the trunk")
        # Nothing of the failed call is held, and the same call now succeeds.
        assert not running.registry.get(reply.session_id).saved
        assert client.forward(1, 0, hidden, mask).shape == (3, 7, HIDDEN)


def test_devices_this_machine_lacks_are_refused_with_the_reason(tiny_dirs):
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda:0" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="must be auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="this machine has no CUDA device"):
            resolve_device("cuda:1")
        result = subprocess.run([sys.executable, "-m", "trunk_server", "--model", str(tiny_dirs["llama"]),
                                 "--bottom-layers", "2", "--top-layers", "2", "--device", "cuda"],
                                capture_output=True, text=True, env={**os.environ, "TRUNK_TOKEN": "x" * 32},
                                cwd=PROJECT_ROOT, timeout=120)
        assert result.returncode == 2 and "no CUDA device" in result.stderr


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_the_blocks_take_the_compute_dtype_while_adapters_and_rotary_frequencies_stay_fp32(tiny_dirs, dtype,
                                                                                            torch_dtype):
    config = TrunkServerConfig(model_dir=tiny_dirs["llama"], n_bottom=2, n_top=2, token="t" * 32, dtype=dtype)
    host = TrunkHost(config)
    params = host.add_adapter("s1", LoraSettings(r=4, alpha=8), seed=0, layers=host.bounds.default)
    assert params and all(param.dtype == torch.float32 for param in params.values())
    frozen = {param.dtype for name, param in host.trunk.named_parameters() if "lora_" not in name}
    assert frozen == {torch_dtype}
    buffers = {name: buffer.dtype for name, buffer in host.trunk.named_buffers() if "inv_freq" in name}
    assert buffers and set(buffers.values()) == {torch.float32}
    hidden = host.to_device(torch.randn(1, 4, HIDDEN))
    out = host.forward("s1", host.bounds.default, hidden, torch.ones(1, 4, dtype=torch.long))
    assert out.dtype == torch_dtype and torch.isfinite(out).all()
