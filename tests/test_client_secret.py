"""The run's seed stays with the data owner: what a real trunk server receives, captured on the wire."""

from __future__ import annotations

import json
from concurrent import futures

import grpc
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer
from trunk_process import start_trunk

from splitcore import LoraSettings
from splitcore.data.formats import load_dataset_file
from splitcore.privacy import ClientSecret, PrivacySettings
from splitcore.remote.client import TrunkClient
from splitcore.remote.proto import trunk_pb2 as pb
from splitcore.training import SplitEngine, SplitTrainer, StepMetrics, TrainConfig
from splitcore.training.batches import prepare_training_data

SEED = 86753090
SERVICE = "/splitlearn.trunk.v1.Trunk/"
# How each RPC is called, and the request message it carries.
METHODS = {
    "Info": ("unary_unary", pb.InfoRequest), "OpenSession": ("unary_unary", pb.OpenSessionRequest),
    "Forward": ("stream_stream", pb.ForwardRequest), "Backward": ("stream_stream", pb.BackwardRequest),
    "Step": ("unary_unary", pb.StepRequest), "ExportState": ("unary_stream", pb.ExportStateRequest),
    "ImportState": ("stream_unary", pb.ImportStateRequest), "CloseSession": ("unary_unary", pb.CloseSessionRequest),
}


class RecordingProxy(grpc.GenericRpcHandler):
    """Forwards every call's bytes to the trunk unchanged and keeps each request message it relays."""

    def __init__(self, upstream: str) -> None:
        self.channel = grpc.insecure_channel(upstream)
        self.requests: list[tuple[str, bytes]] = []

    def service(self, details):
        name = details.method.removeprefix(SERVICE)
        kind, _ = METHODS[name]
        upstream = getattr(self.channel, kind)(details.method)

        def record(payload: bytes) -> bytes:
            self.requests.append((name, payload))
            return payload

        def metadata(context):
            return tuple((k, v) for k, v in context.invocation_metadata() if k == "authorization")

        if kind == "unary_unary":
            return grpc.unary_unary_rpc_method_handler(lambda r, c: upstream(record(r), metadata=metadata(c)))
        if kind == "unary_stream":
            return grpc.unary_stream_rpc_method_handler(lambda r, c: upstream(record(r), metadata=metadata(c)))
        if kind == "stream_unary":
            return grpc.stream_unary_rpc_method_handler(
                lambda rs, c: upstream((record(r) for r in rs), metadata=metadata(c)))
        return grpc.stream_stream_rpc_method_handler(
            lambda rs, c: upstream((record(r) for r in rs), metadata=metadata(c)))


def integers_in(message) -> list[int]:
    """Every integer field value in a message, nested messages included."""
    values = []
    for field, value in message.ListFields():
        items = value if field.is_repeated else [value]
        for item in items:
            if field.type == field.TYPE_MESSAGE:
                values.extend(integers_in(item))
            elif isinstance(item, int) and not isinstance(item, bool):
                values.append(item)
    return values


@pytest.fixture
def proxied_trunk(tiny_dirs, tmp_path):
    trunk = start_trunk(tiny_dirs["llama"], tmp_path)
    proxy = RecordingProxy(trunk.address)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), handlers=[proxy])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield proxy, f"127.0.0.1:{port}", trunk.token
    server.stop(None)
    proxy.channel.close()
    trunk.stop()


def train_two_steps(tiny_dirs, address, token, secret, tmp_path, seed=SEED):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data_path = tmp_path / "data.jsonl"
    data_path.write_text("".join(json.dumps({"text": f"sample number {i} of the owner's text"}) + "\n"
                                 for i in range(8)))
    config = TrainConfig(lora=LoraSettings(r=4, alpha=8, dropout=0.1), max_steps=2, batch_size=2, seq_len=24,
                         seed=seed, val_fraction=0.25, privacy=PrivacySettings(hidden_noise=0.2, grad_noise=0.2))
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    data = prepare_training_data(tokenizer, load_dataset_file(data_path).examples, config)
    events = []
    with TrunkClient(address, token) as client:
        engine = SplitEngine(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]), config, client,
                             secret=secret)
        trainer = SplitTrainer(engine, config, data, tokenizer.pad_token_id, callbacks=[events.append],
                               checkpoint_dir=tmp_path / "ckpt")
        trainer.run()
        engine.close()
    return [e.loss for e in events if isinstance(e, StepMetrics)]


def test_the_trunk_never_receives_the_run_seed(tiny_dirs, proxied_trunk, tmp_path):
    proxy, address, token = proxied_trunk
    secret = ClientSecret.generate()
    train_two_steps(tiny_dirs, address, token, secret, tmp_path)

    parsed = [(name, METHODS[name][1].FromString(payload)) for name, payload in proxy.requests]
    names = {name for name, _ in parsed}
    assert {"OpenSession", "Forward", "Backward", "Step", "ExportState"} <= names
    received = [value for _, message in parsed for value in integers_in(message)]
    assert SEED not in received
    opened = next(message for name, message in parsed if name == "OpenSession")
    # What it gets instead: one value derived with a key it never sees.
    assert opened.dropout_seed == opened.lora.seed == secret.trunk_seed(SEED) != SEED
    assert ClientSecret.generate().trunk_seed(SEED) != opened.dropout_seed
    assert secret.trunk_seed(SEED + 1) != opened.dropout_seed


def test_the_same_key_and_seed_repeat_a_run_and_another_key_does_not(tiny_dirs, proxied_trunk, tmp_path):
    _, address, token = proxied_trunk
    secret = ClientSecret(bytes(range(32)))
    first = train_two_steps(tiny_dirs, address, token, secret, tmp_path / "a")
    again = train_two_steps(tiny_dirs, address, token, ClientSecret(bytes(range(32))), tmp_path / "b")
    other = train_two_steps(tiny_dirs, address, token, ClientSecret(bytes(range(1, 33))), tmp_path / "c")
    assert first == again
    assert other != first  # another key: other noise and trunk dropout masks


def test_a_checkpoint_refuses_to_resume_under_another_key(tiny_dirs, proxied_trunk, tmp_path):
    _, address, token = proxied_trunk
    train_two_steps(tiny_dirs, address, token, ClientSecret(bytes(range(32))), tmp_path)
    config = TrainConfig(lora=LoraSettings(r=4, alpha=8, dropout=0.1), max_steps=2, batch_size=2, seq_len=24,
                         seed=SEED, val_fraction=0.25, privacy=PrivacySettings(hidden_noise=0.2, grad_noise=0.2))
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    data = prepare_training_data(tokenizer, load_dataset_file(tmp_path / "data.jsonl").examples, config)
    with TrunkClient(address, token) as client:
        engine = SplitEngine(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]), config, client,
                             secret=ClientSecret(bytes(range(1, 33))))
        trainer = SplitTrainer(engine, config, data, tokenizer.pad_token_id)
        with pytest.raises(ValueError, match="written with another client secret"):
            trainer.run(resume_from=tmp_path / "ckpt")
        engine.close()


def test_a_secret_is_never_printed():
    secret = ClientSecret(bytes(range(32)))
    assert bytes(range(32)).hex() not in repr(secret) and bytes(range(32)).hex() not in str(secret)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        ClientSecret(b"short")
