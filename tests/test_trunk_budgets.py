"""Per-session budgets, open keys and leases, against real trunk server processes.

Each budget is driven past its limit by one session: the call is refused with
RESOURCE_EXHAUSTED, the reason "budget" in the trailing metadata and a message that names the
limit, and a canary session on the same server keeps answering exactly as before.
"""

from __future__ import annotations

import time

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM
from trunk_process import start_trunk

from splitcore import LoraSettings
from splitcore.model.part_loading import CheckpointModel
from splitcore.remote.client import TrunkClient
from splitcore.remote.errors import REASON_KEY, Fault, Reason, TrunkError
from splitcore.remote.proto import trunk_pb2 as pb
from splitcore.remote.proto import trunk_pb2_grpc as pb_grpc
from splitcore.training import SplitEngine, TrainConfig

HIDDEN = 64
BUDGETS = ("--max-micro-batches", "4", "--max-tokens-per-request", "1024", "--max-saved-graphs", "2",
           "--max-kv-tokens", "40", "--max-lora-rank", "8")


@pytest.fixture(scope="module")
def trunk(tiny_dirs, tmp_path_factory):
    process = start_trunk(tiny_dirs["llama"], tmp_path_factory.mktemp("trunk-logs"), "--max-sessions", "6", *BUDGETS)
    yield process
    process.stop()


def hidden_states(rows, positions, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, positions, HIDDEN, generator=generator), torch.ones(rows, positions, dtype=torch.long)


@pytest.fixture(scope="module")
def canary(trunk):
    """A session that must answer the same before and after every refused request."""
    with TrunkClient(trunk.address, trunk.token) as client:
        client.open_session(LoraSettings(r=4, alpha=8, dropout=0.0), seed=3)
        hidden, mask = hidden_states(2, 5, seed=9)
        expected = client.evaluate(hidden, mask)

        def check():
            assert torch.equal(client.evaluate(hidden, mask), expected)

        yield check


@pytest.fixture
def client(trunk):
    with TrunkClient(trunk.address, trunk.token) as c:
        yield c


def refused(call, *words):
    with pytest.raises(TrunkError) as error:
        call()
    assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.value.reason == Reason.BUDGET and error.value.fault == Fault.BAD_REQUEST
    for word in words:
        assert word in error.value.details
    return error.value


def test_info_reports_the_budgets(client):
    info = client.info()
    assert (info.max_micro_batches, info.max_tokens_per_request, info.max_saved_graphs, info.max_kv_tokens,
            info.max_lora_rank, info.max_positions) == (4, 1024, 2, 40, 8, 512)
    assert info.max_session_memory_bytes == 8192 << 20  # the default


def test_a_forward_more_than_one_step_ahead_of_the_last_applied_step_is_refused(client, canary):
    client.open_session(LoraSettings(r=4, alpha=8, dropout=0.0))
    hidden, mask = hidden_states(1, 4)
    client.forward(1, 0, hidden, mask)
    for step in (2, 7):
        with pytest.raises(TrunkError) as ahead:
            client.forward(step, 0, hidden, mask)
        assert ahead.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert ahead.value.reason == Reason.STEP_CONFLICT
        assert f"step {step} is more than one step ahead of the last applied step 0" in ahead.value.details
    with pytest.raises(TrunkError, match="step 3 is more than one step ahead"):
        client.backward(3, 0, torch.ones(1, 4, HIDDEN), hidden, mask)
    canary()
    # The refusals kept nothing and lost nothing: the step goes on, and the next one opens once it is applied.
    client.backward(1, 0, torch.ones(1, 4, HIDDEN), hidden, mask)
    assert client.step(1, lr=1e-3) == 1
    assert client.forward(2, 0, hidden, mask).shape == (1, 4, HIDDEN)
    with pytest.raises(TrunkError, match="step 3 is more than one step ahead of the last applied step 1"):
        client.forward(3, 0, hidden, mask)
    canary()


def test_a_forward_counts_the_activations_its_graph_keeps(client):
    """On the CPU, Info reports the sessions' counted bytes: a Forward adds its graph (the activations
    autograd saved for Backward, far more than the graph's input and output) and its kept reply."""
    client.open_session(LoraSettings(r=4, alpha=8, dropout=0.0))
    hidden, mask = hidden_states(1, 256)
    ends = 2 * hidden.numel() * 4  # the graph's input and output, fp32
    before = client.info().memory_sessions_bytes
    client.forward(1, 0, hidden, mask)
    added = client.info().memory_sessions_bytes - before
    assert added > 4 * ends + hidden.numel() * 4, (added, ends)
    client.backward(1, 0, torch.ones(1, 256, HIDDEN), hidden, mask)
    client.step(1, lr=1e-3)  # the graph went with its Backward, the replies with the Step; gradients and state stay
    after_step = client.info().memory_sessions_bytes - before
    assert after_step < added - ends


@pytest.fixture(scope="module")
def graph_bytes(trunk):
    """What one Forward of 1 x 512 positions keeps on this model (graph and reply), as the trunk counts it."""
    with TrunkClient(trunk.address, trunk.token) as probe:
        probe.open_session(LoraSettings(r=4, alpha=8, dropout=0.0))
        hidden, mask = hidden_states(1, 512)
        before = probe.info().memory_sessions_bytes
        probe.forward(1, 0, hidden, mask)
        return probe.info().memory_sessions_bytes - before


def test_kept_replies_and_saved_graphs_count_against_the_session_memory_budget(tiny_dirs, tmp_path_factory,
                                                                               graph_bytes):
    """Forward and Backward per micro-batch free each graph, but every Backward's reply is kept until the
    Step: with a budget of one graph and 32 replies, the replies fill it long before the 64 micro-batches
    the trunk allows, the call that would pass it is refused, and the session goes on after its Step."""
    reply = 512 * HIDDEN * 4
    budget_mb = -(-(graph_bytes + 32 * reply) // (1 << 20))
    trunk = start_trunk(tiny_dirs["llama"], tmp_path_factory.mktemp("memory-trunk-logs"),
                        "--max-session-memory-mb", str(budget_mb), "--max-micro-batches", "64")
    try:
        with TrunkClient(trunk.address, trunk.token) as client, TrunkClient(trunk.address, trunk.token) as canary:
            canary.open_session(LoraSettings(r=4, alpha=8, dropout=0.0), seed=3)
            probe = hidden_states(2, 5, seed=9)
            expected = canary.evaluate(*probe)
            client.open_session(LoraSettings(r=4, alpha=8, dropout=0.0))
            hidden, mask = hidden_states(1, 512)
            grad = torch.ones(1, 512, HIDDEN)
            answered = 0
            with pytest.raises(TrunkError) as full:
                for micro in range(64):
                    client.forward(1, micro, hidden, mask)
                    client.backward(1, micro, grad, hidden, mask)
                    answered += 1
            assert 32 <= answered < 64
            assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and full.value.reason == Reason.BUDGET
            details = full.value.details
            assert f"Forward of step 1 micro-batch {answered}" in details, details
            assert "kept replies" in details and f"budget of {budget_mb} MiB per session" in details, details
            assert client.info().memory_sessions_bytes <= 2 * (budget_mb << 20)  # two sessions, each within
            assert torch.equal(canary.evaluate(*probe), expected)
            # The Step frees the step's replies: the session trains on.
            assert client.step(1, lr=1e-3) == 1
            for micro in range(answered):
                client.forward(2, micro, hidden, mask)
                client.backward(2, micro, grad, hidden, mask)
            assert client.step(2, lr=1e-3) == 2
            assert torch.equal(canary.evaluate(*probe), expected)
    finally:
        trunk.stop()


def test_a_micro_batch_index_beyond_the_budget_is_refused(client, canary):
    client.open_session(None)
    refused(lambda: client.forward(1, 4, *hidden_states(1, 3)), "micro-batch 4", "budget of 4 micro-batches")
    canary()
    assert client.forward(1, 3, *hidden_states(1, 3)).shape == (1, 3, HIDDEN)


def test_tokens_per_request_and_positions_beyond_the_model_are_refused(client, canary):
    client.open_session(LoraSettings(r=4, alpha=8))
    refused(lambda: client.forward(1, 0, *hidden_states(4, 300)), "1200 tokens", "budget of 1024 tokens")
    refused(lambda: client.evaluate(*hidden_states(4, 300)), "1200 tokens")
    refused(lambda: client.forward(1, 0, *hidden_states(1, 600)), "600 positions", "model's 512 positions")
    canary()
    assert client.forward(1, 0, *hidden_states(2, 512)).shape == (2, 512, HIDDEN)


def test_a_lora_rank_beyond_the_budget_is_refused_and_leaves_no_session(client, canary):
    before = client.info().active_sessions
    refused(lambda: client.open_session(LoraSettings(r=16, alpha=16)), "rank 16", "rank 8")
    assert client.info().active_sessions == before
    canary()
    client.open_session(LoraSettings(r=8, alpha=16))
    assert client.info().active_sessions == before + 1


def test_the_kv_cache_stops_at_its_budget_and_stays_usable(client, canary):
    client.open_session(None, inference=True)
    hidden, mask = hidden_states(2, 16)
    client.infer(0, hidden, mask)
    for position in range(1, 5):  # 2 rows x 20 positions = 40 tokens: the budget exactly
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        client.infer(position, *hidden_states(2, 1, seed=position)[:1], mask)
    longer = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    refused(lambda: client.infer(5, hidden_states(2, 1)[0], longer), "42 tokens", "budget of 40")
    canary()
    # The refused call left the cache as it was: the session still answers its last call.
    assert client.infer(4, hidden_states(2, 1, seed=4)[0], mask).shape == (2, 1, HIDDEN)


def test_saved_graphs_beyond_the_budget_are_dropped_and_recomputed_from_resent_inputs(trunk, client, canary):
    """With 2 graphs kept, the first of 3 forwards is dropped: its Backward says so with the reason
    "activations-gone" (not in words), and the client resends the inputs and gets the same gradient."""
    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    inputs = [hidden_states(1, 4, seed=micro) for micro in range(3)]
    with TrunkClient(trunk.address, trunk.token) as reference:
        reference.open_session(lora, seed=5)
        reference.forward(1, 0, *inputs[0])
        expected, _ = reference.backward(1, 0, torch.ones(1, 4, HIDDEN), *inputs[0])
    client.open_session(lora, seed=5)
    for micro, (hidden, mask) in enumerate(inputs):
        client.forward(1, micro, hidden, mask)
    stub = pb_grpc.TrunkStub(client.channel)
    with pytest.raises(grpc.RpcError) as gone:
        list(stub.Backward(iter([pb.BackwardRequest(session_id=client.session_id, step=1, micro_batch=0,
                                                    grad_output=client._tensor(torch.ones(1, 4, HIDDEN)))]),
                           metadata=(("authorization", f"Bearer {trunk.token}"),), timeout=30))
    assert gone.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (REASON_KEY, Reason.ACTIVATIONS_GONE.value) in tuple(gone.value.trailing_metadata())
    grad, _ = client.backward(1, 0, torch.ones(1, 4, HIDDEN), *inputs[0])  # resends on its own
    assert torch.equal(grad, expected)
    canary()


def test_a_forward_is_not_run_again_once_its_backward_is_answered(client):
    client.open_session(LoraSettings(r=4, alpha=8, dropout=0.0))
    hidden, mask = hidden_states(1, 4)
    client.forward(1, 0, hidden, mask)
    client.backward(1, 0, torch.ones(1, 4, HIDDEN), hidden, mask)
    with pytest.raises(TrunkError) as again:
        client.forward(1, 0, hidden, mask)
    assert again.value.code == grpc.StatusCode.FAILED_PRECONDITION and again.value.reason == Reason.STEP_CONFLICT
    assert "already went backward" in again.value.details


def open_request(key, **fields):
    return pb.OpenSessionRequest(mode=pb.SESSION_MODE_TRAIN, lora=pb.LoraSpec(r=4, alpha=8), open_key=key, **fields)


def test_a_retried_open_with_the_same_key_returns_the_same_session(trunk, client):
    stub = pb_grpc.TrunkStub(client.channel)
    metadata = (("authorization", f"Bearer {trunk.token}"),)
    before = client.info().active_sessions
    first = stub.OpenSession(open_request("k" * 32), metadata=metadata, timeout=30)
    again = stub.OpenSession(open_request("k" * 32), metadata=metadata, timeout=30)
    assert again.session_id == first.session_id
    assert client.info().active_sessions == before + 1
    other = stub.OpenSession(open_request("j" * 32), metadata=metadata, timeout=30)
    assert other.session_id != first.session_id
    with pytest.raises(grpc.RpcError) as reused:
        stub.OpenSession(open_request("k" * 32, client_label="another"), metadata=metadata, timeout=30)
    assert reused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "already used for a different OpenSession request" in reused.value.details()
    for session in (first, other):
        stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id), metadata=metadata, timeout=30)
    assert client.info().active_sessions == before


@pytest.fixture(scope="module")
def short_lease_trunk(tiny_dirs, tmp_path_factory):
    process = start_trunk(tiny_dirs["llama"], tmp_path_factory.mktemp("trunk-logs"), "--session-lease", "3")
    yield process
    process.stop()


def test_a_session_without_calls_loses_its_lease_and_one_that_calls_keeps_it(short_lease_trunk):
    trunk = short_lease_trunk
    with TrunkClient(trunk.address, trunk.token) as idle, TrunkClient(trunk.address, trunk.token) as busy:
        assert idle.info().session_ttl_s == 3
        idle.open_session(None)
        busy.open_session(None)
        hidden, mask = hidden_states(1, 2)
        opened = time.monotonic()
        # Each call renews the busy session's lease; the idle one makes none.
        while idle.info().active_sessions == 2:
            busy.forward(1, 0, hidden, mask)
            time.sleep(0.2)
            assert time.monotonic() - opened < 60, "the idle session was never expired"
        assert time.monotonic() - opened >= 3
        assert busy.forward(1, 0, hidden, mask).shape == (1, 2, HIDDEN)
        with pytest.raises(TrunkError) as gone:
            idle.forward(1, 0, hidden, mask)
        assert gone.value.code == grpc.StatusCode.NOT_FOUND and gone.value.fault == Fault.SESSION_GONE
        assert "lease of 3 s ran out" in gone.value.details
    assert "expired: no call for 3s" in trunk.log()


def test_a_run_keeps_its_idle_session_alive_while_it_works_on_its_own(tiny_dirs, short_lease_trunk):
    """A worker's leakage audit can outlast the lease: the engine renews it meanwhile, changing nothing."""
    trunk = short_lease_trunk
    config = TrainConfig(lora=LoraSettings(r=4, alpha=8), max_steps=1, batch_size=1, seq_len=8)
    with TrunkClient(trunk.address, trunk.token) as client, TrunkClient(trunk.address, trunk.token) as watcher:
        engine = SplitEngine(CheckpointModel(tiny_dirs["llama"]), config, client)
        assert engine.session_lease_s == 3
        with engine.session_kept_alive(every_s=0.5):
            time.sleep(7)  # over twice the lease without a training call
        assert watcher.info().active_sessions >= 1
        hidden, mask = hidden_states(1, 2)
        assert client.forward(1, 0, hidden, mask).shape == (1, 2, HIDDEN), "the session is still there"
        assert client.step(0, lr=0.0) == 0, "renewing applied no step"
        engine.close()


def test_a_run_beyond_the_budgets_is_refused_before_a_session_opens(tiny_dirs, trunk, client):
    """The client reads the budgets from Info and says what to change, instead of failing mid-run."""
    config = TrainConfig(lora=LoraSettings(r=16, alpha=16), max_steps=1, batch_size=4, grad_accum=5, seq_len=600)
    before = client.info().active_sessions
    with pytest.raises(ValueError) as refused:
        SplitEngine(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]), config, client)
    message = str(refused.value)
    for words in ("5 micro-batches per step", "it allows 4", "4 x 600 = 2400 tokens", "it allows 1024 per call",
                  "sequences of 600 tokens; the model has 512 positions", "rank 16; it allows rank 8"):
        assert words in message
    assert client.info().active_sessions == before

