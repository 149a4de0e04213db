"""A real trunk server process on a loopback port: auth, sessions, idempotent steps,
recompute, state export/import, KV-cache inference, malformed requests, shutdown."""

from __future__ import annotations

import grpc
import pytest
import torch
from conftest import run_concurrently
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from transformers import AutoModelForCausalLM
from trunk_calls import HIDDEN, LORA, inputs, raw_stub
from trunk_process import start_trunk

from splitcore import LoraSettings, add_lora, family_for, split_model
from splitcore.remote.client import TrunkClient, TrunkError
from splitcore.remote.proto import trunk_pb2 as pb
from splitcore.remote.proto import trunk_pb2_grpc as pb_grpc
from splitcore.remote.wire import encode_mask, encode_tensor


@pytest.fixture(scope="module")
def trunk(tiny_dirs, tmp_path_factory):
    process = start_trunk(tiny_dirs["llama"], tmp_path_factory.mktemp("trunk-logs"), "--max-sessions", "4",
                          "--max-saved-graphs", "2", "--max-message-mb", "1")
    yield process
    process.stop()


@pytest.fixture
def client(trunk):
    with TrunkClient(trunk.address, trunk.token) as c:
        yield c


def local_trunk(tiny_dirs, lora=LORA, seed=0):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    trunk = split_model(model, 2, 2)[1]
    return add_lora(trunk, family_for(model.config), lora, seed=seed) if lora else trunk


def test_info_describes_the_hosted_trunk(client):
    info = client.info()
    assert (info.model_type, info.num_layers, info.trunk_start, info.trunk_end) == ("llama", 6, 2, 4)
    assert info.hidden_size == HIDDEN and info.max_sessions == 4 and len(info.weights_fingerprint) == 64


def test_missing_or_wrong_token_is_unauthenticated_and_health_needs_none(trunk):
    channel = grpc.insecure_channel(trunk.address)
    stub = pb_grpc.TrunkStub(channel)
    with pytest.raises(grpc.RpcError) as missing:
        stub.Info(pb.InfoRequest(), timeout=10)
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as wrong:
        stub.Info(pb.InfoRequest(), timeout=10, metadata=(("authorization", "Bearer not-the-token"),))
    assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as streaming:
        list(stub.Forward(iter([pb.ForwardRequest()]), timeout=10))
    assert streaming.value.code() == grpc.StatusCode.UNAUTHENTICATED
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()


def test_remote_forward_and_backward_equal_the_local_trunk(client, tiny_dirs):
    hidden, mask, grad = inputs()
    client.open_session(LORA, seed=0)
    remote_out = client.forward(1, 0, hidden, mask)
    remote_grad, sq_norm = client.backward(1, 0, grad, hidden, mask)

    local = local_trunk(tiny_dirs)
    leaf = hidden.clone().requires_grad_(True)
    local_out = local(leaf, mask)
    local_out.backward(grad)
    local_sq = sum(float(p.grad.double().pow(2).sum()) for p in local.parameters() if p.grad is not None)
    assert (remote_out - local_out).abs().max().item() <= 1e-6
    assert (remote_grad - leaf.grad).abs().max().item() <= 1e-6
    assert sq_norm == pytest.approx(local_sq, rel=1e-6) and sq_norm > 0


def test_frozen_trunk_session_still_returns_input_gradients(client, tiny_dirs):
    hidden, mask, grad = inputs(1)
    client.open_session(None)
    out = client.forward(1, 0, hidden, mask)
    grad_in, sq_norm = client.backward(1, 0, grad, hidden, mask)
    local = local_trunk(tiny_dirs, lora=None)
    leaf = hidden.clone().requires_grad_(True)
    local(leaf, mask).backward(grad)
    assert sq_norm == 0.0
    assert (grad_in - leaf.grad).abs().max().item() <= 1e-6
    assert out.shape == hidden.shape


def same_state(a: bytes, b: bytes) -> bool:
    """Two exported trunk states hold the same tensors (the file's key order may differ)."""
    left, right = load_safetensors(a), load_safetensors(b)
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def run_steps(client, steps, retry=False):
    """Two micro-batches per step; with ``retry`` every call is sent twice."""
    outputs = []
    for step in range(1, steps + 1):
        for micro in range(2):
            hidden, mask, grad = inputs(seed=step * 10 + micro)
            for _ in range(2 if retry else 1):
                outputs.append(client.forward(step, micro, hidden, mask))
            for _ in range(2 if retry else 1):
                client.backward(step, micro, grad, hidden, mask)
        for _ in range(2 if retry else 1):
            assert client.step(step, lr=0.05, clip_coef=0.5) == step
    return outputs


def test_a_retried_step_does_not_update_twice(trunk):
    with TrunkClient(trunk.address, trunk.token) as once, TrunkClient(trunk.address, trunk.token) as twice:
        once.open_session(LORA, seed=3)
        twice.open_session(LORA, seed=3)
        out_once = run_steps(once, 3)
        out_twice = run_steps(twice, 3, retry=True)
        assert all(torch.equal(a, b) for a, b in zip(out_once, out_twice[::2]))
        assert all(torch.equal(a, b) for a, b in zip(out_twice[::2], out_twice[1::2]))
        assert same_state(once.export_state()[1], twice.export_state()[1])
        with pytest.raises(TrunkError, match="step 2 was already applied"):
            twice.forward(2, 5, *inputs()[:2])


def test_concurrent_sessions_equal_their_solo_runs(trunk):
    solo = {}
    for seed in (5, 6):
        with TrunkClient(trunk.address, trunk.token) as c:
            c.open_session(LORA, seed=seed)
            solo[seed] = (run_steps(c, 3), c.export_state()[1])
    together = {}

    def work(seed):
        with TrunkClient(trunk.address, trunk.token) as c:
            c.open_session(LORA, seed=seed)
            together[seed] = (run_steps(c, 3), c.export_state()[1])

    errors = run_concurrently({seed: (lambda seed=seed: work(seed)) for seed in (5, 6)})
    assert not errors
    for seed in (5, 6):
        diffs = [(a - b).abs().max().item() for a, b in zip(solo[seed][0], together[seed][0])]
        assert max(diffs) == 0.0, diffs
        assert same_state(solo[seed][1], together[seed][1])
    assert not same_state(solo[5][1], solo[6][1])


def test_backward_recomputes_when_activations_are_gone(client, tiny_dirs):
    """The server keeps 2 micro-batches of activations here; the first is evicted by the third."""
    client.open_session(LORA, seed=0)
    batches = [inputs(seed=s) for s in range(3)]
    for micro, (hidden, mask, _) in enumerate(batches):
        client.forward(1, micro, hidden, mask)
    sent_before = client.bytes_sent
    grad_in, _ = client.backward(1, 0, batches[0][2], batches[0][0], batches[0][1])
    assert client.bytes_sent - sent_before > 2 * batches[0][0].numel() * 4, "the inputs were resent"
    local = local_trunk(tiny_dirs)
    leaf = batches[0][0].clone().requires_grad_(True)
    local(leaf, batches[0][1]).backward(batches[0][2])
    assert (grad_in - leaf.grad).abs().max().item() <= 1e-6


def test_training_dropout_masks_depend_on_seed_step_and_micro_batch_only(trunk):
    """With LoRA dropout on, a forward is a function of (seed, step, micro-batch): a new session
    (a restarted trunk, a resumed run) draws the same masks, and a recompute for Backward after
    the activations were evicted matches the forward it replaces."""
    dropped = LoraSettings(r=4, alpha=8, dropout=0.5)
    hidden, mask, grad = inputs()

    def trained_session(c, seed):
        c.open_session(dropped, seed=seed)
        run_steps(c, 1)  # LoRA B starts at zero, which hides dropout: one step makes it count

    outputs, grads = {}, {}
    for run in ("first", "again"):
        with TrunkClient(trunk.address, trunk.token) as c:
            trained_session(c, 7)
            outputs[run] = [c.forward(2, micro, hidden, mask) for micro in range(3)]  # micro 0 gets evicted
            grads[run] = c.backward(2, 0, grad, hidden, mask)[0]
    for first, again in zip(outputs["first"], outputs["again"]):
        assert torch.equal(first, again)
    assert not torch.equal(outputs["first"][0], outputs["first"][1]), "another micro-batch, other masks"
    assert torch.equal(grads["first"], grads["again"])
    with TrunkClient(trunk.address, trunk.token) as c:  # held activations: the same gradient as the recompute
        trained_session(c, 7)
        c.forward(2, 0, hidden, mask)
        assert torch.equal(c.backward(2, 0, grad, hidden, mask)[0], grads["first"])
    with TrunkClient(trunk.address, trunk.token) as c:
        trained_session(c, 8)
        assert not torch.equal(c.forward(2, 0, hidden, mask), outputs["first"][0]), "another seed, other masks"


def test_sessions_in_turn_each_run_with_their_own_adapter_and_dropout_mode(trunk):
    """The trunk switches the active adapter and the dropout mode only when they change: whatever other
    sessions ran between, a training forward draws its own masks with its own adapter, and an evaluation
    (also a new session's first call) runs without dropout."""
    dropped = LoraSettings(r=4, alpha=8, dropout=0.5)
    hidden, mask, _ = inputs()
    with TrunkClient(trunk.address, trunk.token) as alone:
        alone.open_session(dropped, seed=7)
        run_steps(alone, 1)  # LoRA B starts at zero, which hides dropout: one step makes it count
        trained = alone.forward(2, 0, hidden, mask)
        evaluated = alone.evaluate(hidden, mask)
    assert not torch.equal(trained, evaluated), "dropout is on in training, off in evaluation"
    with (TrunkClient(trunk.address, trunk.token) as a, TrunkClient(trunk.address, trunk.token) as b,
          TrunkClient(trunk.address, trunk.token) as c):
        a.open_session(dropped, seed=7)
        run_steps(a, 1)
        b.open_session(dropped, seed=8)  # a second adapter on the same model
        run_steps(b, 1)
        b.evaluate(hidden, mask)  # leaves b's adapter active and dropout off
        assert torch.equal(a.forward(2, 0, hidden, mask), trained)
        assert torch.equal(a.evaluate(hidden, mask), evaluated)
        step, state = a.export_state()
        c.open_session(dropped, seed=9)  # its modules are new: they start with dropout on
        c.import_state(step, state)
        assert torch.equal(c.evaluate(hidden, mask), evaluated)


def test_exported_state_restores_into_a_new_session(trunk):
    with TrunkClient(trunk.address, trunk.token) as first:
        first.open_session(LORA, seed=9)
        run_steps(first, 2)
        step, state = first.export_state()
        assert step == 2
        hidden, mask, _ = inputs(seed=77)
        first_next = first.forward(3, 0, hidden, mask)
    with TrunkClient(trunk.address, trunk.token) as second:
        second.open_session(LORA, seed=123)  # different init, overwritten by the import
        assert second.import_state(step, state) == 2
        assert same_state(second.export_state()[1], state)
        # The next step continues from the restored adapter and optimizer moments.
        hidden, mask, grad = inputs(seed=77)
        assert torch.equal(second.forward(3, 0, hidden, mask), first_next)


def test_a_refused_import_leaves_the_session_as_it_was(trunk):
    with TrunkClient(trunk.address, trunk.token) as donor:
        donor.open_session(LORA, seed=9)
        run_steps(donor, 2)
        _, good = donor.export_state()
    tensors = load_safetensors(good)
    step_key = next(k for k in tensors if k.endswith(".step"))
    tensors[step_key] = torch.tensor([float("nan")])  # the adapter part is fine, the optimizer part is not
    bad = save_safetensors(tensors)
    with TrunkClient(trunk.address, trunk.token) as client:
        client.open_session(LORA, seed=123)
        run_steps(client, 1)
        _, before = client.export_state()
        with pytest.raises(TrunkError) as refused:
            client.import_state(2, bad)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "step must be one finite number" in refused.value.details
        assert same_state(client.export_state()[1], before), "neither the adapter nor the optimizer changed"
        assert not same_state(before, good)


def test_session_cap_answers_resource_exhausted(trunk):
    clients = [TrunkClient(trunk.address, trunk.token) for _ in range(5)]
    try:
        for c in clients[:4]:
            c.open_session(None)
        with pytest.raises(TrunkError) as error:
            clients[4].open_session(None)
        assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "capacity of 4 sessions" in str(error.value)
    finally:
        for c in clients:
            c.close_session()
            c.close()


def test_inference_session_with_a_kv_cache_equals_the_full_forward(client, tiny_dirs):
    hidden, mask, _ = inputs(seed=4)
    client.open_session(LORA, seed=0, inference=True)
    pieces = [client.infer(0, hidden[:, :3], mask[:, :3])]
    for i in range(3, hidden.shape[1]):
        pieces.append(client.infer(i - 2, hidden[:, i:i + 1], mask[:, :i + 1]))
    again = client.infer(hidden.shape[1] - 3, hidden[:, -1:], mask)  # a retry of the last call
    assert torch.equal(again, pieces[-1])
    local = local_trunk(tiny_dirs)
    with torch.no_grad():
        expected = local(hidden, mask)
    got = torch.cat(pieces, dim=1)
    real = mask.bool()
    assert (got - expected)[real].abs().max().item() <= 1e-5


def test_large_tensors_stream_through_a_small_message_limit(client):
    """The server here accepts 1 MiB messages; this request is 4 MiB (and within the token budget)."""
    hidden = torch.randn(32, 512, HIDDEN)
    mask = torch.ones(32, 512, dtype=torch.long)
    client.open_session(None)
    out = client.forward(1, 0, hidden, mask)
    assert out.shape == hidden.shape and torch.isfinite(out).all()


def malformed_cases(session_id):
    good = encode_tensor(torch.randn(2, 3, HIDDEN))
    mask = encode_mask(torch.ones(2, 3, dtype=torch.long))

    def with_hidden(**changes):
        tensor = pb.Tensor()
        tensor.CopyFrom(good)
        for key, value in changes.items():
            if key == "shape":
                del tensor.shape[:]
                tensor.shape.extend(value)
            else:
                setattr(tensor, key, value)
        return pb.ForwardRequest(session_id=session_id, step=1, hidden=tensor, attention_mask=mask)

    return {
        "bad dtype": (with_hidden(dtype="complex128"), grpc.StatusCode.INVALID_ARGUMENT, "unknown dtype"),
        "bad encoding": (with_hidden(encoding="fp4"), grpc.StatusCode.INVALID_ARGUMENT, "unknown encoding"),
        "wrong hidden size": (with_hidden(shape=[2, 6, 32]), grpc.StatusCode.INVALID_ARGUMENT,
                              "does not match the expected"),
        "byte length": (with_hidden(data=good.data[:-4]), grpc.StatusCode.INVALID_ARGUMENT, "data bytes do not match"),
        "absurd size": (with_hidden(shape=[1 << 20, 1 << 20, HIDDEN]), grpc.StatusCode.INVALID_ARGUMENT,
                        "exceeds the limit"),
        "no mask": (pb.ForwardRequest(session_id=session_id, step=1, hidden=good), grpc.StatusCode.INVALID_ARGUMENT,
                    "attention_mask is missing"),
        "unknown session": (pb.ForwardRequest(session_id="nope", step=1, hidden=good, attention_mask=mask),
                            grpc.StatusCode.NOT_FOUND, "unknown session"),
    }


def test_malformed_requests_get_a_status_and_the_server_keeps_serving(trunk, client):
    session_id = client.open_session(LORA).session_id
    channel, stub, metadata = raw_stub(trunk)
    try:
        for name, (request, code, text) in malformed_cases(session_id).items():
            with pytest.raises(grpc.RpcError) as error:
                list(stub.Forward(iter([request]), timeout=30, metadata=metadata))
            assert error.value.code() == code, name
            assert text in error.value.details(), (name, error.value.details())
        bad_calls = [
            (lambda: stub.OpenSession(pb.OpenSessionRequest(mode=pb.SESSION_MODE_TRAIN, lora=pb.LoraSpec(r=0)),
                                      timeout=30, metadata=metadata), "rank r must be"),
            (lambda: stub.OpenSession(pb.OpenSessionRequest(), timeout=30, metadata=metadata), "mode must be"),
            (lambda: stub.Step(pb.StepRequest(session_id=session_id, step=1, lr=float("nan"), clip_coef=1),
                               timeout=30, metadata=metadata), "lr must be a finite number"),
            (lambda: stub.ImportState(iter([pb.ImportStateRequest(session_id=session_id, safetensors=b"garbage")]),
                                      timeout=30, metadata=metadata), "not a valid safetensors file"),
            (lambda: list(stub.Backward(iter([pb.BackwardRequest(session_id=session_id, step=1)]), timeout=30,
                                        metadata=metadata)), "are not held; send the hidden states"),
        ]
        for call, text in bad_calls:
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert error.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
            assert text in error.value.details()
        assert stub.Info(pb.InfoRequest(), timeout=30, metadata=metadata).hidden_size == HIDDEN
        assert client.forward(1, 0, *inputs()[:2]).shape == (2, 6, HIDDEN)
    finally:
        channel.close()


def test_sigterm_shuts_down_cleanly(tiny_dirs, tmp_path):
    process = start_trunk(tiny_dirs["gpt2"], tmp_path)
    with TrunkClient(process.address, process.token) as c:
        assert c.info().model_type == "gpt2"
    assert process.stop() == 0
    assert "signal 15: shutting down" in process.log()
    assert process.process.stdout.read().strip() == "trunk server stopped"


def test_start_up_errors_are_reported(tiny_dirs, tmp_path):
    with pytest.raises(RuntimeError, match="n_bottom \\+ n_top"):
        start_trunk(tiny_dirs["llama"], tmp_path, n_bottom=3, n_top=3)
    with pytest.raises(RuntimeError, match="at least 16 characters"):
        start_trunk(tiny_dirs["llama"], tmp_path, token="short")
