"""The trunk's own accounting, against real trunk server processes: the counters Info reports,
the session log (open, close, expiry, shutdown) and the Prometheus endpoint (--metrics-port)."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from polling import wait_until
from prometheus_client.parser import text_string_to_metric_families
from trunk_process import start_trunk

from splitcore import LoraSettings
from splitcore.remote.client import TrunkClient
from splitcore.remote.proto import trunk_pb2 as pb
from splitcore.remote.proto import trunk_pb2_grpc as pb_grpc
from trunk_server.config import TrunkServerConfig

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
HIDDEN = 64


@pytest.fixture(scope="module")
def trunk(tiny_dirs, tmp_path_factory):
    """A trunk with metrics on a free port."""
    process = start_trunk(tiny_dirs["llama"], tmp_path_factory.mktemp("trunk-logs"), "--max-sessions", "4",
                          "--metrics-port", "0")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def plain_trunk(tiny_dirs, tmp_path_factory):
    """A trunk without metrics and with a short lease."""
    process = start_trunk(tiny_dirs["llama"], tmp_path_factory.mktemp("trunk-logs"), "--session-lease", "2")
    yield process
    process.stop()


def hidden_states(rows, positions, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, positions, HIDDEN, generator=generator), torch.ones(rows, positions, dtype=torch.long)


def counters(info: pb.InfoResponse) -> dict[str, float]:
    return {name: getattr(info, name) for name in
            ("uptime_s", "sessions_opened", "sessions_closed", "sessions_expired", "tokens_processed", "busy_s")}


def scrape(trunk) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value, as a Prometheus server would read them."""
    with urllib.request.urlopen(trunk.metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples, name, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def listening_ports(pid: int) -> set[int]:
    """TCP ports the process listens on (Linux: its socket inodes matched against /proc/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def test_info_counts_sessions_tokens_and_busy_time(trunk):
    with TrunkClient(trunk.address, trunk.token) as client:
        before = counters(client.info())
        client.open_session(LORA, seed=1, label="stats-training")
        hidden, mask = hidden_states(2, 5)
        client.forward(1, 0, hidden, mask)
        client.forward(1, 0, hidden, mask)  # a retry: answered from the kept reply, not run again
        client.backward(1, 0, torch.ones(2, 5, HIDDEN), hidden, mask)
        client.forward(1, 1, *hidden_states(3, 4, seed=1))
        assert client.step(1, lr=0.01) == 1
        client.evaluate(*hidden_states(1, 7))
        during = counters(client.info())
        assert during["sessions_opened"] == before["sessions_opened"] + 1
        assert during["tokens_processed"] == before["tokens_processed"] + 2 * 5 + 3 * 4 + 1 * 7
        assert during["busy_s"] > before["busy_s"]
        assert during["uptime_s"] > before["uptime_s"] and during["busy_s"] < during["uptime_s"]
        assert during["sessions_closed"] == before["sessions_closed"]
        client.close_session()
        after = counters(client.info())
    assert after["sessions_closed"] == before["sessions_closed"] + 1
    assert after["sessions_expired"] == before["sessions_expired"]
    assert after["tokens_processed"] == during["tokens_processed"]


def test_inference_tokens_count_new_positions_once(trunk):
    with TrunkClient(trunk.address, trunk.token) as client:
        before = client.info().tokens_processed
        client.open_session(None, inference=True, label="stats-inference")
        hidden, mask = hidden_states(1, 4)
        client.infer(0, hidden, mask)
        longer = torch.ones(1, 5, dtype=torch.long)
        client.infer(1, hidden[:, :1], longer)
        client.infer(1, hidden[:, :1], longer)  # a retry of the last call
        assert client.info().tokens_processed == before + 4 + 1


def test_open_close_and_shutdown_are_logged_without_data(tiny_dirs, tmp_path):
    process = start_trunk(tiny_dirs["llama"], tmp_path)
    try:
        hidden, mask = hidden_states(2, 3, seed=5)
        with TrunkClient(process.address, process.token) as client:
            session_id = client.open_session(LORA, label="job-17").session_id
            client.forward(1, 0, hidden, mask)
            client.backward(1, 0, torch.ones(2, 3, HIDDEN), hidden, mask)
            client.step(1, lr=0.01)
        with TrunkClient(process.address, process.token) as client:
            left_open = client.open_session(None, inference=True, label="left-open").session_id
            client.infer(0, *hidden_states(1, 2))
            client.session_id = None  # leave it open for the shutdown
        assert process.stop() == 0
    finally:
        process.stop()
    log = process.log()
    assert f"opened session {session_id[:8]} (training, layers 2-3, trunk LoRA on) for 'job-17'" in log
    assert re.search(rf"closed session {session_id[:8]} for 'job-17': training, 1 step applied, 6 tokens, "
                     r"lived \d+\.\d s", log)
    assert re.search(rf"closed session {left_open[:8]} for 'left-open' at shutdown: inference, 1 inference call, "
                     r"2 tokens, lived \d+\.\d s", log)
    assert session_id not in log, "only the id's prefix is logged"
    values = {f"{v:.4f}" for v in hidden.flatten().tolist()[:8]}
    assert not any(v in log for v in values) and "tensor(" not in log


def test_a_lapsed_lease_is_counted_and_logged_as_an_expiry(plain_trunk):
    with TrunkClient(plain_trunk.address, plain_trunk.token) as client:
        before = counters(client.info())
        session_id = client.open_session(None, label="stats-expiry").session_id
        client.forward(1, 0, *hidden_states(1, 3))
        wait_until(lambda: client.info().sessions_expired == before["sessions_expired"] + 1,
                   "the idle session's lease lapses", timeout=60, interval=0.1)
        after = counters(client.info())
        client.session_id = None  # gone already
    assert after["sessions_opened"] == before["sessions_opened"] + 1
    assert after["sessions_closed"] == before["sessions_closed"]
    assert after["tokens_processed"] == before["tokens_processed"] + 3
    assert re.search(rf"session {session_id[:8]} for 'stats-expiry' expired: no call for 2s \(its lease\), "
                     r"idle for \d+\.\d s; training, 0 steps applied, 3 tokens, lived \d+\.\d s", plain_trunk.log())


def test_metrics_are_off_by_default(plain_trunk):
    assert plain_trunk.metrics_url is None and "metrics" not in plain_trunk.startup_line
    assert listening_ports(plain_trunk.pid) == {port_of(plain_trunk.address)}


def test_metrics_count_requests_tokens_and_sessions(trunk):
    assert trunk.metrics_url.startswith("http://127.0.0.1:") and f"metrics on {trunk.metrics_url}" in trunk.startup_line
    assert listening_ports(trunk.pid) == {port_of(trunk.address), port_of(trunk.metrics_url.rsplit("/", 1)[0])}
    before = scrape(trunk)
    channel = grpc.insecure_channel(trunk.address)
    stub = pb_grpc.TrunkStub(channel)
    try:
        with TrunkClient(trunk.address, trunk.token) as client:
            client.info()
            client.open_session(LORA, seed=2, label="stats-metrics")
            hidden, mask = hidden_states(2, 4)
            client.forward(1, 0, hidden, mask)
            client.forward(1, 0, hidden, mask)  # a retry
            during = scrape(trunk)
            with pytest.raises(grpc.RpcError) as unknown:
                list(stub.Forward(iter([pb.ForwardRequest(session_id="nope", step=1)]), timeout=10,
                                  metadata=(("authorization", f"Bearer {trunk.token}"),)))
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as unauthenticated:
                stub.Info(pb.InfoRequest(), timeout=10, metadata=(("authorization", "Bearer wrong-token"),))
            assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        channel.close()
    after = scrape(trunk)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    expected = {("Info", "OK"): 1, ("Info", "UNAUTHENTICATED"): 1, ("OpenSession", "OK"): 1, ("Forward", "OK"): 2,
                ("Forward", "NOT_FOUND"): 1, ("CloseSession", "OK"): 1}
    seen = {(dict(labels)["rpc"], dict(labels)["code"]) for name, labels in after
            if name == "splitlearn_trunk_requests_total"}
    for rpc, code in seen | expected.keys():
        assert delta("splitlearn_trunk_requests_total", rpc=rpc, code=code) == expected.get((rpc, code), 0), (rpc, code)
    for rpc in ("Info", "OpenSession", "Forward", "CloseSession"):
        calls = sum(count for (name, code), count in expected.items() if name == rpc)
        assert delta("splitlearn_trunk_request_duration_seconds_count", rpc=rpc) == calls, rpc
        assert delta("splitlearn_trunk_request_duration_seconds_bucket", rpc=rpc, le="+Inf") == calls, rpc
        assert delta("splitlearn_trunk_request_duration_seconds_bucket", rpc=rpc, le="60.0") == calls, rpc
    assert delta("splitlearn_trunk_tokens_processed_total", kind="training") == 2 * 4
    assert delta("splitlearn_trunk_tokens_processed_total", kind="inference") == 0
    assert delta("splitlearn_trunk_sessions_opened_total", mode="training") == 1
    assert delta("splitlearn_trunk_sessions_closed_total", how="closed") == 1
    assert delta("splitlearn_trunk_sessions_closed_total", how="expired") == 0
    assert value(during, "splitlearn_trunk_sessions_active") == value(before, "splitlearn_trunk_sessions_active") + 1
    assert value(after, "splitlearn_trunk_sessions_active") == value(before, "splitlearn_trunk_sessions_active")
    assert value(after, "splitlearn_trunk_sessions_max") == 4
    assert delta("splitlearn_trunk_busy_seconds_total") > 0
    assert value(after, "splitlearn_trunk_uptime_seconds") > value(before, "splitlearn_trunk_uptime_seconds")
    assert value(after, "splitlearn_trunk_memory_bytes", kind="base") > 0
    assert value(after, "splitlearn_trunk_memory_bytes", kind="total") > value(after, "splitlearn_trunk_memory_bytes",
                                                                               kind="base")
    assert value(during, "splitlearn_trunk_memory_bytes", kind="sessions") > 0
    info = [dict(labels) for name, labels in after if name == "splitlearn_trunk_info"]
    assert len(info) == 1 and info[0]["device"] == "cpu" and info[0]["dtype"] == "float32"
    assert info[0]["model_id"] == "llama" and info[0]["version"]


def test_the_metrics_options_are_checked(tiny_dirs, tmp_path):
    with pytest.raises(ValueError, match="metrics port must be in"):
        TrunkServerConfig(model_dir=tmp_path, n_bottom=2, n_top=2, token="t" * 16, metrics_port=70000)
    with pytest.raises(ValueError, match="is the gRPC port"):
        TrunkServerConfig(model_dir=tmp_path, n_bottom=2, n_top=2, token="t" * 16, port=9000, metrics_port=9000)
    with pytest.raises(RuntimeError, match="metrics port must be in"):
        start_trunk(tiny_dirs["gpt2"], tmp_path, "--metrics-port", "-1")


def test_the_metrics_port_can_come_from_the_environment(tiny_dirs, tmp_path, monkeypatch):
    """`make run` and compose turn metrics on with TRUNK_METRICS_PORT (0: a free port); a bad value is refused."""
    monkeypatch.setenv("TRUNK_METRICS_PORT", "0")
    server = start_trunk(tiny_dirs["gpt2"], tmp_path)
    try:
        assert server.metrics_url is not None and f"metrics on {server.metrics_url}" in server.startup_line
        with urllib.request.urlopen(server.metrics_url, timeout=10) as reply:
            assert b"splitlearn_trunk_sessions_active" in reply.read()
    finally:
        server.stop()
    monkeypatch.setenv("TRUNK_METRICS_PORT", "nine")
    with pytest.raises(RuntimeError, match="TRUNK_METRICS_PORT='nine' is not a port number"):
        start_trunk(tiny_dirs["gpt2"], tmp_path)
