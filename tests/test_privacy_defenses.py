"""The defenses themselves: clipped noise on both channels, NoPeek, and their settings."""

from __future__ import annotations

import json
import math
from concurrent import futures

import grpc
import pytest
import torch
from peft import PeftModel
from recording_proxy import RecordingProxy
from training_helpers import SECRET
from transformers import AutoModelForCausalLM, AutoTokenizer
from trunk_process import start_trunk

from splitcore import LoraSettings, positions_from_mask, split_model
from splitcore.data.formats import load_dataset_file
from splitcore.model.split_spec import SplitSpec
from splitcore.privacy import ChannelNoise, ClientSecret, PrivacySettings, clip_and_noise
from splitcore.privacy.noise import CLIP_MULTIPLE
from splitcore.privacy.nopeek import distance_correlation, nopeek_penalty
from splitcore.remote.client import TrunkClient
from splitcore.training import LocalEngine, SplitEngine, SplitTrainer, StepMetrics, TrainConfig
from splitcore.training.batches import prepare_training_data


def test_clipping_bounds_each_position_and_the_noise_has_the_asked_scale():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(4, 50, 256, generator=generator)
    values[0, 0] *= 100  # one huge position, like an attention sink
    mask = torch.ones(4, 50, dtype=torch.long)
    clipped = clip_and_noise(values, mask, 1e-9, torch.Generator().manual_seed(1))
    median = values.norm(dim=-1).median()
    assert clipped.norm(dim=-1).max() <= CLIP_MULTIPLE * median * (1 + 1e-4)
    assert torch.allclose(clipped[1:], values[1:], atol=1e-5), "typical positions are not clipped"
    noisy = clip_and_noise(values[1:], mask[1:], 0.5, torch.Generator().manual_seed(1))
    ratio = (noisy - values[1:]).norm(dim=-1).mean() / values[1:].norm(dim=-1).median()
    assert ratio == pytest.approx(0.5, rel=0.05)
    assert clip_and_noise(values, mask, 0.0, torch.Generator()) is values


def test_noise_follows_the_secret_the_step_and_the_micro_batch():
    hidden, mask = torch.randn(2, 5, 16), torch.ones(2, 5)
    one = ChannelNoise(SECRET, seed=3, hidden_scale=0.5)
    assert torch.equal(one.on_hidden(hidden, mask, 1, 0), ChannelNoise(SECRET, 3, 0.5).on_hidden(hidden, mask, 1, 0))
    assert not torch.equal(one.on_hidden(hidden, mask, 1, 0), one.on_hidden(hidden, mask, 1, 1))
    assert not torch.equal(one.on_hidden(hidden, mask, 1, 0), one.on_hidden(hidden, mask, 2, 0))
    other = ChannelNoise(ClientSecret(bytes(range(1, 33))), 3, 0.5)
    assert not torch.equal(one.on_hidden(hidden, mask, 1, 0), other.on_hidden(hidden, mask, 1, 0))


def test_gradient_noise_changes_only_the_gradient():
    hidden = torch.randn(2, 5, 16, requires_grad=True)
    mask = torch.ones(2, 5)
    noise = ChannelNoise(SECRET, 0, grad_scale=2.0)
    out = noise.on_gradient(hidden, mask, 1, 0)
    assert torch.equal(out, hidden)
    upstream = torch.randn(2, 5, 16)
    out.backward(upstream)
    blurred = hidden.grad
    assert not torch.allclose(blurred, upstream)
    ratio = (blurred - upstream).norm(dim=-1).mean() / upstream.norm(dim=-1).median()
    assert ratio == pytest.approx(2.0, rel=0.2)


def test_distance_correlation_tells_dependent_from_independent():
    x = torch.randn(300, 8)
    assert float(distance_correlation(x, x)) == pytest.approx(1.0, abs=1e-4)
    assert float(distance_correlation(x, 3 * x + 1)) == pytest.approx(1.0, abs=1e-4)
    assert float(distance_correlation(x, torch.randn(300, 8))) < 0.4
    with pytest.raises(ValueError, match="paired rows"):
        distance_correlation(x, x[:10])


@pytest.mark.parametrize("given,message", [
    ({"hidden_noise": -1}, "hidden_noise must be a number from 0"), ({"grad_noise": math.inf}, "grad_noise"),
    ({"nopeek": "a lot"}, "nopeek"), ({"bottom_layers": 0}, "bottom_layers must be a whole number"),
    ({"top_layers": True}, "top_layers"), ({"colour": 1}, "unknown privacy setting 'colour'"),
])
def test_privacy_settings_refuse_what_they_cannot_use(given, message):
    with pytest.raises(ValueError, match=message):
        PrivacySettings.from_dict(given)


def test_a_local_run_refuses_defenses_that_need_a_cut(tiny_dirs):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    for privacy in (PrivacySettings(hidden_noise=0.1), PrivacySettings(nopeek=1.0)):
        with pytest.raises(ValueError, match="a local run has no cut"):
            LocalEngine(model, TrainConfig(max_steps=1, privacy=privacy), SplitSpec(6, 2, 2))


@pytest.fixture(scope="module")
def trunk(tiny_dirs, tmp_path_factory):
    process = start_trunk(tiny_dirs["llama"], tmp_path_factory.mktemp("defense-trunk-logs"))
    yield process
    process.stop()


def bottom_dcor(tiny_dirs, engine: SplitEngine, data) -> float:
    """Distance correlation between the Bottom's input and output over the training examples."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    ids = [example.input_ids for example in data.train]
    width = max(len(i) for i in ids)
    input_ids = torch.tensor([list(i) + [tokenizer.pad_token_id] * (width - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
    engine.train(False)
    with torch.no_grad():
        return float(nopeek_penalty(engine._bottom_part.embed(input_ids, mask), engine.bottom(input_ids, mask), mask))


def test_nopeek_trains_the_bottom_to_decorrelate_what_the_trunk_receives(tiny_dirs, trunk, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": f"the owner's private line {i}: {i * 7} apples"}) + "\n"
                            for i in range(24)))
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    results = {}
    for weight in (0.0, 5.0):
        config = TrainConfig(lora=LoraSettings(r=8, alpha=16, dropout=0.0), max_steps=12, batch_size=4, seq_len=24,
                             learning_rate=2e-2, seed=1, privacy=PrivacySettings(nopeek=weight))
        data = prepare_training_data(tokenizer, load_dataset_file(path).examples, config)
        events = []
        with TrunkClient(trunk.address, trunk.token) as client:
            engine = SplitEngine(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]), config, client,
                                 secret=SECRET)
            SplitTrainer(engine, config, data, tokenizer.pad_token_id, callbacks=[events.append]).run()
            results[weight] = (bottom_dcor(tiny_dirs, engine, data), [e.loss for e in events
                                                                       if isinstance(e, StepMetrics)])
            engine.close()
    (plain_dcor, plain_losses), (nopeek_dcor, nopeek_losses) = results[0.0], results[5.0]
    assert nopeek_dcor < plain_dcor - 0.05, (plain_dcor, nopeek_dcor)
    # The reported loss is the task's alone, and the task still trains.
    assert nopeek_losses[0] == pytest.approx(plain_losses[0], rel=1e-6)
    assert nopeek_losses[-1] < nopeek_losses[0]


def test_the_trunk_receives_blurred_hidden_states(tiny_dirs, trunk):
    """What crosses the cut with hidden noise on differs from the Bottom's output by about the asked share."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    batch = tokenizer(["a private sentence of the data owner", "another one"], return_tensors="pt", padding=True)
    bottom = split_model(model, 2, 2)[0]
    noise = ChannelNoise(SECRET, 0, hidden_scale=1.0)
    with torch.no_grad():
        clean = bottom(batch.input_ids, batch.attention_mask)
        sent = noise.on_hidden(clean, batch.attention_mask, 1, 0)
    real = batch.attention_mask.bool()
    typical = clean.norm(dim=-1)[real].median()
    assert ((sent - clean).norm(dim=-1)[real].mean() / typical).item() == pytest.approx(1.0, rel=0.1)


def small_run(tiny_dirs, tmp_path, privacy: PrivacySettings, train_trunk_lora=True, steps=3):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": f"line {i} of the owner's notes: {i * 3} boats"}) + "\n"
                            for i in range(16)))
    config = TrainConfig(lora=LoraSettings(r=4, alpha=8, dropout=0.0), train_trunk_lora=train_trunk_lora,
                         max_steps=steps, batch_size=4, seq_len=24, learning_rate=1e-2, seed=2, privacy=privacy)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    return config, tokenizer, prepare_training_data(tokenizer, load_dataset_file(path).examples, config)


def test_a_private_bottom_is_drawn_from_the_secret_and_travels_in_the_adapter(tiny_dirs, trunk, tmp_path):
    config, tokenizer, data = small_run(tiny_dirs, tmp_path, PrivacySettings(private_bottom=1.0))
    batch = tokenizer(["the owner's private notes", "boats"], return_tensors="pt", padding=True)
    ids, mask = batch.input_ids, batch.attention_mask
    public = split_model(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval(), 2, 2)[0]
    outputs = {}
    with TrunkClient(trunk.address, trunk.token) as client:
        for name, secret in (("a", SECRET), ("again", SECRET), ("other", ClientSecret(bytes(range(1, 33))))):
            engine = SplitEngine(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]), config, client,
                                 secret=secret)
            engine.train(False)
            with torch.no_grad():
                outputs[name] = engine.bottom(ids, mask)
            if name == "a":
                SplitTrainer(engine, config, data, tokenizer.pad_token_id).run()
                engine.train(False)
                with torch.no_grad():
                    hidden = client.evaluate(engine.bottom(ids, mask), mask)
                    split_logits = engine.top(hidden, mask).logits
                SplitTrainer(engine, config, data, tokenizer.pad_token_id).export_adapter(
                    tmp_path / "adapter", str(tiny_dirs["llama"]))
            engine.close()
    with torch.no_grad():
        clean = public(ids, mask)
    real = mask.bool()
    change = ((outputs["a"] - clean).norm(dim=-1)[real] / clean.norm(dim=-1)[real]).mean()
    assert change > 0.2, "the private Bottom computes something the public one does not"
    assert torch.equal(outputs["a"], outputs["again"]) and not torch.allclose(outputs["a"], outputs["other"])
    # The secret change is part of the adapter: the full model with it computes what the split run computed.
    full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]), tmp_path / "adapter")
    with torch.no_grad():
        logits = full.eval()(input_ids=ids, attention_mask=mask,
                             position_ids=positions_from_mask(mask, ids.shape[1])).logits
    assert (logits - split_logits)[real].abs().max() <= 1e-4


def test_with_no_gradients_to_the_trunk_it_gets_no_backward_and_only_the_top_trains(tiny_dirs, tmp_path):
    privacy = PrivacySettings(gradients_to_trunk=False)
    config, tokenizer, data = small_run(tiny_dirs, tmp_path, privacy, train_trunk_lora=False)
    real_trunk = start_trunk(tiny_dirs["llama"], tmp_path)
    proxy = RecordingProxy(real_trunk.address)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), handlers=[proxy])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with TrunkClient(f"127.0.0.1:{port}", real_trunk.token) as client:
            engine = SplitEngine(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]), config, client,
                                 secret=SECRET)
            split_events = []
            SplitTrainer(engine, config, data, tokenizer.pad_token_id, callbacks=[split_events.append]).run()
            trained = set(engine.params)
            engine.close()
    finally:
        server.stop(None)
        real_trunk.stop()
    called = [name for name, _ in proxy.requests]
    assert "Forward" in called and "Backward" not in called and "Step" in called
    assert trained and all(".layers.4." in name or ".layers.5." in name for name in trained)
    local_events = []
    local = LocalEngine(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]), config, SplitSpec(6, 2, 2))
    SplitTrainer(local, config, data, tokenizer.pad_token_id, callbacks=[local_events.append]).run()
    split_losses = [e.loss for e in split_events if isinstance(e, StepMetrics)]
    assert split_losses == pytest.approx([e.loss for e in local_events if isinstance(e, StepMetrics)], rel=1e-5)
    assert len(split_losses) == 3 and split_losses[-1] < split_losses[0]


def test_no_gradients_to_the_trunk_refuses_what_needs_them():
    with pytest.raises(ValueError, match="its LoRA cannot learn"):
        TrainConfig(max_steps=1, privacy=PrivacySettings(gradients_to_trunk=False))
    with pytest.raises(ValueError, match="NoPeek and gradient noise have nothing to act on"):
        PrivacySettings(gradients_to_trunk=False, grad_noise=1.0)
