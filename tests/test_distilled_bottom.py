"""A distilled private Bottom: trained on public text through a real trunk before any user data is sent."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pytest
import torch
import torch.nn.functional as F
from recording_proxy import SERVICE, RecordingProxy, start_proxy
from transformers import AutoModelForCausalLM, AutoTokenizer
from trunk_process import start_trunk

from splitcore import LoraSettings, split_model
from splitcore.cli.train import add_train_parser, train_config
from splitcore.data.formats import load_dataset_file
from splitcore.privacy import ClientSecret, PrivacySettings
from splitcore.privacy.distilled_bottom import DistillConfig, FrozenTrunkSessions, distil_private_bottom
from splitcore.remote import state as trunk_state
from splitcore.remote.client import TrunkClient
from splitcore.remote.proto import trunk_pb2 as pb
from splitcore.training import SplitEngine, SplitTrainer, TrainConfig
from splitcore.training.batches import prepare_training_data

SECRET = ClientSecret(bytes(range(7, 39)))
USER_TEXT = ["the owner's private diary: boats at dawn", "a secret recipe with 3 eggs"]


@pytest.fixture(scope="module")
def recorded_trunk(tiny_dirs, tmp_path_factory):
    """A real trunk behind a proxy that keeps every request it relays, in order."""
    trunk = start_trunk(tiny_dirs["llama"], tmp_path_factory.mktemp("distil-trunk-logs"))
    proxy = start_proxy(trunk.address)
    yield proxy.proxy, proxy.address, trunk.token
    proxy.stop()
    trunk.stop()


def run_config(distill_steps: int, train_trunk_lora: bool = True) -> TrainConfig:
    return TrainConfig(lora=LoraSettings(r=4, alpha=8, dropout=0.0), train_trunk_lora=train_trunk_lora, max_steps=1,
                       batch_size=4, seq_len=32, learning_rate=1e-2, seed=5,
                       privacy=PrivacySettings(private_bottom=1.0, distill_bottom=distill_steps))


def open_engine(tiny_dirs, client, config, tokenizer=None) -> SplitEngine:
    return SplitEngine(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]), config, client, secret=SECRET,
                       tokenizer=tokenizer)


@torch.no_grad()
def kl_to_public_model(tiny_dirs, engine: SplitEngine, tokenizer) -> float:
    """Mean KL from the public model's next-token distribution to the client's, on text the distillation
    never saw, computed here with the whole model (the trunk's blocks run locally, as the trunk runs them)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    public_bottom, trunk, _ = split_model(model, engine.spec.n_bottom, engine.spec.n_top)
    tokenizer.padding_side = "right"
    batch = tokenizer(USER_TEXT, return_tensors="pt", padding=True)
    ids, mask = batch.input_ids, batch.attention_mask
    real = mask.bool()
    engine.train(False)
    teacher = engine.top(trunk(public_bottom(ids, mask), mask), mask).logits[real].log_softmax(-1)
    student = engine.top(trunk(engine.bottom(ids, mask), mask), mask).logits[real].log_softmax(-1)
    return float(F.kl_div(student, teacher, log_target=True, reduction="batchmean"))


def parsed(proxy: RecordingProxy) -> list[tuple[str, object]]:
    """Every request message the trunk received, in order, parsed (a streamed call's chunks one by one)."""
    def message_class(method: str):
        return getattr(pb, SERVICE.methods_by_name[method].input_type.name)

    return [(record.method, message_class(record.method).FromString(record.payload)) for record in proxy.records()
            if record.method in SERVICE.methods_by_name]


def test_distillation_brings_the_private_bottom_back_towards_the_public_model(tiny_dirs, recorded_trunk):
    _, address, token = recorded_trunk
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    config = DistillConfig(steps=8, adversary_weight=0.0, public_tokens_per_step=128, chunk_tokens=32,
                           probe_tokens=1024, heldout_tokens=256)
    with TrunkClient(address, token) as client, TrunkClient(address, token) as side:
        engine = open_engine(tiny_dirs, client, run_config(0))  # the randomised private Bottom, not distilled
        before = kl_to_public_model(tiny_dirs, engine, tokenizer)
        embeddings = engine._bottom_part.backbone.embed_tokens.weight
        frozen = FrozenTrunkSessions([side], [engine.spec.trunk_layers])
        report = distil_private_bottom(engine.bottom, engine.top, frozen, tokenizer, config, SECRET, 5, embeddings)
        after = kl_to_public_model(tiny_dirs, engine, tokenizer)
        engine.close()
    assert after < 0.8 * before, (before, after)
    # The report measures the same on held-out public text, through the real trunk.
    assert report.steps == 8 and report.kl_after < report.kl_before
    assert report.agreement_after > report.agreement_before
    assert "distilled the private Bottom for 8 steps" in report.describe()


def test_the_trunk_sees_public_text_on_its_own_session_before_the_training_session_opens(tiny_dirs, recorded_trunk,
                                                                                          tmp_path):
    proxy, address, token = recorded_trunk
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": f"{line} ({i})"}) + "\n" for i in range(8) for line in USER_TEXT))
    config = run_config(3)
    data = prepare_training_data(tokenizer, load_dataset_file(path).examples, config)
    with TrunkClient(address, token) as client:
        plain = open_engine(tiny_dirs, client, run_config(0))
        plain_state = trunk_state.unpack(plain.remote_state())
        plain.close()
        proxy.clear()
        engine = open_engine(tiny_dirs, client, config, tokenizer)
        # The training session starts as it would without the distillation: the same LoRA, no optimizer
        # state, no step applied; the client's Top LoRA is untouched and nothing here holds a gradient.
        state = trunk_state.unpack(engine.remote_state())
        assert state.adapter.keys() == plain_state.adapter.keys()
        assert all(torch.equal(state.adapter[key], plain_state.adapter[key]) for key in state.adapter)
        assert not state.optimizer and engine.client.export_state()[0] == 0
        assert all(not p.detach().any() for name, p in engine.top.named_parameters() if "lora_B" in name)
        assert all(p.grad is None for p in engine.params.values())
        assert client.info().active_sessions == 1, "the distillation's session is closed"
        SplitTrainer(engine, config, data, tokenizer.pad_token_id).run()
        engine.close()
    requests = parsed(proxy)
    opened = [index for index, (name, _) in enumerate(requests) if name == "OpenSession"]
    assert len(opened) == 2
    distil_open, train_open = opened
    assert not requests[distil_open][1].HasField("lora"), "the distillation's session has no LoRA to train"
    assert requests[train_open][1].HasField("lora")
    distil_session = {message.session_id for name, message in requests[distil_open + 1:train_open]
                      if name in ("Forward", "Backward", "Step")}
    assert len(distil_session) == 1
    closed = [index for index, (name, message) in enumerate(requests)
              if name == "CloseSession" and message.session_id in distil_session]
    assert closed and closed[0] < train_open
    forwards = [(index, message) for index, (name, message) in enumerate(requests) if name == "Forward"]
    assert any(index < train_open for index, _ in forwards) and any(index > train_open for index, _ in forwards)
    # Every hidden state sent before the training session opened was sent on the distillation's session.
    assert all(message.session_id in distil_session for index, message in forwards if index < train_open)
    assert not any(message.session_id in distil_session for index, message in forwards if index > train_open)


def test_a_fresh_run_refuses_to_start_undistilled_and_a_resumed_one_needs_no_distillation(tiny_dirs, recorded_trunk,
                                                                                          tmp_path):
    _, address, token = recorded_trunk
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in USER_TEXT * 4))
    config = dataclasses.replace(run_config(2), max_steps=2)
    data = prepare_training_data(tokenizer, load_dataset_file(path).examples, config)
    with TrunkClient(address, token) as client:
        engine = open_engine(tiny_dirs, client, config, tokenizer)
        first = SplitTrainer(engine, config, data, tokenizer.pad_token_id, checkpoint_dir=tmp_path / "ckpt")
        first.should_cancel = lambda: first.step >= 1
        assert first.run().status == "cancelled"
        engine.close()
        undistilled = open_engine(tiny_dirs, client, config)  # no tokenizer: no distillation
        assert undistilled.distillation is None
        with pytest.raises(ValueError, match="pass tokenizer= to SplitEngine"):
            SplitTrainer(undistilled, config, data, tokenizer.pad_token_id).run()
        resumed = SplitTrainer(undistilled, config, data, tokenizer.pad_token_id, checkpoint_dir=tmp_path / "ckpt")
        assert resumed.run(resume_from=tmp_path / "ckpt").status == "completed"
        assert resumed.step == 2
        undistilled.close()


@pytest.mark.parametrize("given,message", [
    ({"distill_bottom": 10}, "set private_bottom above 0"),
    ({"private_bottom": 1.0, "distill_bottom": -1}, "distill_bottom must be a whole number"),
    ({"private_bottom": 1.0, "distill_bottom": 2.5}, "distill_bottom must be a whole number"),
    ({"private_bottom": 1.0, "distill_bottom": True}, "distill_bottom must be a whole number"),
])
def test_the_distill_setting_refuses_what_it_cannot_use(given, message):
    with pytest.raises(ValueError, match=message):
        PrivacySettings.from_dict(given)


def test_the_distill_setting_is_described_stored_and_read_from_the_command_line():
    settings = PrivacySettings(private_bottom=1.0, distill_bottom=200, gradients_to_trunk=False)
    assert "private Bottom 1 distilled 200 steps" in settings.describe()
    assert PrivacySettings.from_dict(settings.to_dict()) == settings
    assert PrivacySettings.from_dict({"private_bottom": 1.0}).distill_bottom == 0
    commands = argparse.ArgumentParser().add_subparsers()
    add_train_parser(commands)
    args = commands.choices["train"].parse_args(["--model", "m", "--data", "d", "--out", "o", "--trunk", "t:1",
                                                 "--steps", "3", "--private-bottom", "1", "--distill-bottom", "50"])
    assert train_config(args).privacy == PrivacySettings(private_bottom=1.0, distill_bottom=50)


@pytest.mark.parametrize("given,message", [
    ({"steps": 0}, "steps must be a whole number from 1"), ({"learning_rate": 0.0}, "learning_rate"),
    ({"adversary_weight": -1.0}, "adversary_weight"), ({"public_tokens_per_step": 8}, "public_tokens_per_step"),
    ({"refit_every": 0}, "refit_every"), ({"max_grad_norm": float("nan")}, "max_grad_norm"),
])
def test_the_distill_config_refuses_what_it_cannot_use(given, message):
    with pytest.raises(ValueError, match=f"distillation: {message}"):
        DistillConfig(**{"steps": 10, **given})


def test_a_runs_distillation_fits_its_sequences_and_micro_batches():
    config = DistillConfig.for_run(100, batch_size=2, seq_len=32)
    assert (config.steps, config.chunk_tokens, config.rows_per_call) == (100, 32, 2)
    assert config.chunks_per_step == DistillConfig.public_tokens_per_step // 32
    assert DistillConfig.for_run(5, 8, 4096).chunk_tokens == DistillConfig.chunk_tokens
