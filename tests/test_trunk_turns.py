"""Sessions take the model in turn; a call whose caller gave up is dropped before it computes; gRPC's
own refusal at the server's cap on concurrent calls is waited out, not taken for a full trunk.

The deadline test runs a real gRPC server in this process, so it can hold the model while a
call waits for it; the others run against real trunk server processes.
"""

from __future__ import annotations

import contextlib
import threading

import grpc
import pytest
import torch
from polling import wait_until

from splitcore import LoraSettings
from splitcore.remote.client import RetryPolicy, TrunkClient
from splitcore.remote.errors import Fault, TrunkError
from trunk_server.config import TrunkServerConfig
from trunk_server.host import TrunkHost
from trunk_server.server import create_server
from trunk_server.turns import FairLock

HIDDEN = 64
LORA = LoraSettings(r=4, alpha=8, dropout=0.0)


def hidden_states(rows, positions, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, positions, HIDDEN, generator=generator), torch.ones(rows, positions, dtype=torch.long)


def test_the_model_is_granted_in_the_order_it_was_asked_for():
    lock = FairLock()
    order: list[int] = []

    def wait_turn(index):
        with lock:
            order.append(index)

    lock.acquire()
    threads = []
    for index in range(6):
        threads.append(threading.Thread(target=wait_turn, args=(index,)))
        threads[-1].start()
        wait_until(lambda: lock.waiting() == index + 1, f"thread {index} queues for the lock")
    with lock:  # the holder may take it again (reentrant), ahead of no one but itself
        pass
    assert order == []
    lock.release()
    for thread in threads:
        thread.join(timeout=30)
    assert order == list(range(6))
    with pytest.raises(RuntimeError, match="does not hold"):
        lock.release()


@contextlib.contextmanager
def in_process_trunk(tiny_dirs, **options):
    config = TrunkServerConfig(model_dir=tiny_dirs["llama"], n_bottom=2, n_top=2, token="t" * 32, port=0, **options)
    host = TrunkHost(config)
    running = create_server(config, host)
    try:
        yield host, running, f"127.0.0.1:{running.port}"
    finally:
        running.stop(grace_s=1)


def test_a_call_whose_deadline_passed_while_it_waited_is_dropped_before_it_computes(tiny_dirs):
    token = "t" * 32
    hidden, mask = hidden_states(1, 6)
    with (in_process_trunk(tiny_dirs) as (host, running, address),
          TrunkClient(address, token, timeout_s=0.5, retry=RetryPolicy(attempts=1)) as client):
        client.open_session(LORA, seed=4)
        session = running.registry.get(client.session_id)
        failures: list[TrunkError] = []

        def forward():
            try:
                client.forward(1, 0, hidden, mask)
            except TrunkError as error:
                failures.append(error)

        host.lock.acquire()  # another session's long computation
        try:
            caller = threading.Thread(target=forward)
            caller.start()
            wait_until(lambda: host.lock.waiting() == 1, "the Forward waits for the model")
            caller.join(timeout=30)  # its caller gives up at its deadline
            assert [f.code for f in failures] == [grpc.StatusCode.DEADLINE_EXCEEDED]
            busy = host.stats.snapshot().busy_s
        finally:
            host.lock.release()
        wait_until(lambda: host.stats.snapshot().requests.get(("Forward", "DEADLINE_EXCEEDED")) == 1,
                   "the server ends the dropped call", observed=lambda: host.stats.snapshot().requests)
        assert host.stats.snapshot().busy_s == busy, "the dropped call did not compute"
        assert not session.saved and not session.forward_replies and session.tokens == 0
        # The retry is answered in turn, and the session is as if the dropped call had never come.
        client.timeout_s = 60
        out = client.forward(1, 0, hidden, mask)
        grad, _ = client.backward(1, 0, torch.ones_like(hidden), hidden, mask)
        assert session.tokens == 6
        with TrunkClient(address, token) as reference:
            reference.open_session(LORA, seed=4)
            assert torch.equal(reference.forward(1, 0, hidden, mask), out)
            assert torch.equal(reference.backward(1, 0, torch.ones_like(hidden), hidden, mask)[0], grad)


def test_a_refusal_at_the_cap_on_concurrent_calls_is_waited_out(tiny_dirs):
    """With room for one call in flight, a second client's call meets gRPC's own RESOURCE_EXHAUSTED
    (no reason): it waits with backoff instead of failing, and goes through once the first call ends."""
    token = "t" * 32
    hidden, mask = hidden_states(1, 6)
    with (in_process_trunk(tiny_dirs, max_concurrent_rpcs=1) as (host, running, address),
          TrunkClient(address, token) as first, TrunkClient(address, token, timeout_s=60) as second):
        first.open_session(LORA, seed=1)
        second.open_session(LORA, seed=2)
        answers: dict[str, torch.Tensor] = {}
        errors: list[BaseException] = []

        def forward(name, client):
            try:
                answers[name] = client.forward(1, 0, hidden, mask)
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        host.lock.acquire()
        try:
            held = threading.Thread(target=forward, args=("first", first))
            held.start()
            wait_until(lambda: host.lock.waiting() == 1, "the first call holds the only slot")
            refused = threading.Thread(target=forward, args=("second", second))
            refused.start()
            wait_until(lambda: second.overload_retries >= 2, "the second call is refused and retried")
            assert not errors and not answers
        finally:
            host.lock.release()
        held.join(timeout=60)
        refused.join(timeout=60)
        assert not errors, errors
        assert set(answers) == {"first", "second"}
        # A refusal the server gives a reason for is not waited out.
        with pytest.raises(TrunkError) as budget:
            second.open_session(LoraSettings(r=512, alpha=8))
        assert budget.value.fault == Fault.BAD_REQUEST and second.overload_retries >= 2
