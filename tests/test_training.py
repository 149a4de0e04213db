"""The training loop's pieces in one process: schedule, settings, data order, checkpoints,
cancellation and resume (local engine; the split engine is tested over gRPC elsewhere)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from splitcore import LoraSettings
from splitcore.data.examples import IGNORE_INDEX, TokenizedExample, tokenize_examples
from splitcore.data.formats import PromptCompletionExample, TextExample
from splitcore.model.split_spec import SplitSpec
from splitcore.training import LocalEngine, SplitTrainer, StepMetrics, TrainConfig
from splitcore.training import checkpoints as checkpoints_module
from splitcore.training import list_checkpoints, split_train_val
from splitcore.training.batches import MicroBatches, collate
from splitcore.training.checkpoints import read_checkpoint_state
from splitcore.training.schedule import learning_rate_at

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)


def examples(n=24):
    pairs = [PromptCompletionExample(f"Q{i}: what is {i} plus {i}?", f" {2 * i}.") for i in range(n)]
    return pairs + [TextExample("split learning " * (1 + i % 3)) for i in range(n // 3)]


def fake_tokenized(n):
    return [TokenizedExample(input_ids=tuple(range(1, 3 + i % 4)), labels=tuple(range(1, 3 + i % 4)),
                             full_length=2 + i % 4) for i in range(n)]


# ------------------------------------------------------------------ schedule


def test_warmup_climbs_linearly_to_the_peak():
    assert [learning_rate_at(s, 10, 1.0, 4, "linear") for s in (1, 2, 3, 4)] == [0.25, 0.5, 0.75, 1.0]


def test_linear_decay_starts_at_the_peak_and_never_wastes_a_step():
    rates = [learning_rate_at(s, 6, 1.0, 2, "linear") for s in range(3, 7)]
    assert rates == [1.0, 0.75, 0.5, 0.25]


def test_cosine_decay_follows_half_a_cosine():
    rates = [learning_rate_at(s, 4, 2.0, 0, "cosine") for s in range(1, 5)]
    expected = [2.0 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert rates == pytest.approx(expected)
    assert rates[-1] > 0


def test_schedule_rejects_step_zero_and_unknown_kinds():
    with pytest.raises(ValueError, match="count from 1"):
        learning_rate_at(0, 10, 1.0, 0, "linear")
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        learning_rate_at(1, 10, 1.0, 0, "step")


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize("kwargs,message", [
    (dict(), "exactly one of max_steps and epochs"),
    (dict(max_steps=3, epochs=1.0), "exactly one of max_steps and epochs"),
    (dict(max_steps=0), "max_steps must be an integer from 1"),
    (dict(epochs=-1.0), "epochs must be a number in"),
    (dict(max_steps=1, batch_size=0), "batch_size must be an integer from 1"),
    (dict(max_steps=1, grad_accum=True), "grad_accum must be an integer"),
    (dict(max_steps=1, seq_len=1), "seq_len must be an integer from 2"),
    (dict(max_steps=1, learning_rate=0.0), r"learning_rate must be in \(0, 1\]"),
    (dict(max_steps=1, learning_rate=float("nan")), "learning_rate must be"),
    (dict(max_steps=1, schedule="step"), "schedule must be one of linear, cosine"),
    (dict(max_steps=1, max_grad_norm=-1.0), "max_grad_norm must be >= 0"),
    (dict(max_steps=1, val_fraction=1.0), r"val_fraction must be in \[0, 1\)"),
    (dict(max_steps=1, wire_encoding="fp8"), "wire encoding must be one of fp32, bf16, fp16, int8"),
])
def test_train_config_rejects_bad_values_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_epochs_give_the_step_count_and_the_config_round_trips():
    config = TrainConfig(epochs=2.5, batch_size=4, grad_accum=2, lora=LoraSettings(target_modules=("q_proj",)))
    assert config.total_steps(10) == math.ceil(2.5 * 10 / 8)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# ------------------------------------------------------------------ data


def test_micro_batches_are_a_pure_function_of_seed_and_index():
    data = fake_tokenized(10)
    a, b = MicroBatches(data, 3, seed=7, pad_token_id=0), MicroBatches(data, 3, seed=7, pad_token_id=0)
    assert [a.indices(j) for j in range(8)] == [b.indices(j) for j in reversed(range(8))][::-1]
    other = MicroBatches(data, 3, seed=8, pad_token_id=0)
    assert [a.indices(j) for j in range(4)] != [other.indices(j) for j in range(4)]


def test_each_epoch_visits_every_example_once_in_a_new_order():
    data = fake_tokenized(12)
    batches = MicroBatches(data, 4, seed=1, pad_token_id=0)
    epoch0 = sum((batches.indices(j) for j in range(3)), [])
    epoch1 = sum((batches.indices(j) for j in range(3, 6)), [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1
    assert batches.epoch_of(3) == 1.0


def test_collate_pads_on_the_right_and_ignores_padding_in_the_loss():
    data = [TokenizedExample(input_ids=(5, 6, 7), labels=(IGNORE_INDEX, 6, 7), full_length=3),
            TokenizedExample(input_ids=(8,) * 2, labels=(8, 8), full_length=2)]
    batch = collate(data, pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 8, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.labels.tolist() == [[IGNORE_INDEX, 6, 7], [8, 8, IGNORE_INDEX]]
    assert batch.num_trained_tokens == 3 and batch.num_tokens == 5


def test_validation_split_is_deterministic_disjoint_and_drops_untrainable_examples():
    data = fake_tokenized(20) + [TokenizedExample(input_ids=(1, 2), labels=(IGNORE_INDEX,) * 2, full_length=9)]
    first, again = split_train_val(data, 0.25, seed=3), split_train_val(data, 0.25, seed=3)
    assert first == again and first.dropped == 1
    assert len(first.val) == 5 and len(first.train) == 15
    assert split_train_val(data, 0.25, seed=4).val != first.val
    assert len(split_train_val(data[:3], 0.01, seed=0).val) == 1, "a positive fraction holds out at least one"


def test_validation_split_errors_say_what_to_change():
    with pytest.raises(ValueError, match="raise the sequence length"):
        split_train_val([TokenizedExample(input_ids=(1, 2), labels=(IGNORE_INDEX,) * 2, full_length=50)], 0.0, 0)
    with pytest.raises(ValueError, match="leaves no training examples"):
        split_train_val(fake_tokenized(1), 0.5, 0)


# ------------------------------------------------------------------ the loop (local engine)


@pytest.fixture(scope="module")
def tokenized(tiny_dirs):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    return tokenizer, tokenize_examples(tokenizer, examples(), 48)


def make_trainer(tiny_dirs, tokenized, config, checkpoint_dir=None, events=None, should_cancel=None):
    tokenizer, data = tokenized
    engine = LocalEngine(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]), config, SplitSpec(6, 2, 2))
    return SplitTrainer(engine, config, split_train_val(data, config.val_fraction, config.seed),
                        tokenizer.pad_token_id, checkpoint_dir=checkpoint_dir,
                        callbacks=[events.append] if events is not None else (), should_cancel=should_cancel)


CONFIG = TrainConfig(lora=LORA, max_steps=8, batch_size=3, grad_accum=2, learning_rate=2e-2, warmup_steps=2,
                     max_grad_norm=0.5, val_fraction=0.2, eval_every=4, checkpoint_every=3)


def step_losses(events):
    return {e.step: e.loss for e in events if isinstance(e, StepMetrics)}


def test_gradient_accumulation_equals_one_big_batch(tiny_dirs, tokenized):
    accumulated, whole = [], []
    make_trainer(tiny_dirs, tokenized, TrainConfig(lora=LORA, max_steps=3, batch_size=2, grad_accum=3,
                                                   learning_rate=1e-2), events=accumulated).run()
    make_trainer(tiny_dirs, tokenized, TrainConfig(lora=LORA, max_steps=3, batch_size=6, grad_accum=1,
                                                   learning_rate=1e-2), events=whole).run()
    a, b = step_losses(accumulated), step_losses(whole)
    assert a.keys() == b.keys() == {1, 2, 3}
    assert all(a[s] == pytest.approx(b[s], rel=1e-5) for s in a)


def test_loss_falls_and_clipping_bounds_the_update(tiny_dirs, tokenized, tmp_path):
    events = []
    result = make_trainer(tiny_dirs, tokenized, CONFIG, tmp_path / "ckpt", events).run()
    steps = [e for e in events if isinstance(e, StepMetrics)]
    assert result.status == "completed" and result.step == 8 == len(steps)
    assert steps[-1].loss < steps[0].loss
    assert any(s.grad_norm > CONFIG.max_grad_norm for s in steps), "the test must exercise clipping"
    assert [s.lr for s in steps[:3]] == pytest.approx([1e-2, 2e-2, 2e-2])
    assert result.val_loss is not None and math.isfinite(result.val_loss)
    assert [p.name for p in list_checkpoints(tmp_path / "ckpt")] == ["step-00000006", "step-00000008"]


def test_cancel_keeps_a_checkpoint_and_resume_equals_an_uninterrupted_run(tiny_dirs, tokenized, tmp_path):
    straight = []
    make_trainer(tiny_dirs, tokenized, CONFIG, tmp_path / "straight", straight).run()

    first = []
    cancelled = make_trainer(tiny_dirs, tokenized, CONFIG, tmp_path / "ckpt", first,
                             should_cancel=lambda: len(step_losses(first)) >= 5).run()
    assert cancelled.status == "cancelled" and cancelled.step == 5
    assert read_checkpoint_state(tmp_path / "ckpt").step == 5

    resumed_events = []
    resumed = make_trainer(tiny_dirs, tokenized, CONFIG, tmp_path / "ckpt", resumed_events)
    result = resumed.run(resume_from=tmp_path / "ckpt")
    assert result.status == "completed" and sorted(step_losses(resumed_events)) == [6, 7, 8]
    expected = step_losses(straight)
    for step, loss in step_losses(resumed_events).items():
        assert loss == pytest.approx(expected[step], rel=1e-5)
    adapter = tmp_path / "adapter"
    resumed.export_adapter(adapter, str(tiny_dirs["llama"]))
    assert (adapter / "adapter_model.safetensors").is_file()


def test_resume_refuses_other_settings(tiny_dirs, tokenized, tmp_path):
    make_trainer(tiny_dirs, tokenized, TrainConfig(lora=LORA, max_steps=2, batch_size=2), tmp_path).run()
    other = TrainConfig(lora=LORA, max_steps=2, batch_size=3)
    with pytest.raises(ValueError, match="written with batch_size=2, this run has batch_size=3"):
        make_trainer(tiny_dirs, tokenized, other, tmp_path).run(resume_from=tmp_path)


def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(tiny_dirs, tokenized, tmp_path, monkeypatch):
    config = TrainConfig(lora=LORA, max_steps=4, batch_size=2, checkpoint_every=2)
    events = []
    trainer = make_trainer(tiny_dirs, tokenized, config, tmp_path, events,
                           should_cancel=lambda: len(step_losses(events)) >= 2)
    trainer.run()
    before = (tmp_path / "step-00000002" / "client_state.safetensors").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints_module, "save_file", disk_full)
    resumed = make_trainer(tiny_dirs, tokenized, config, tmp_path)
    with pytest.raises(OSError, match="No space left"):
        resumed.run(resume_from=tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002"]
    assert (tmp_path / "step-00000002" / "client_state.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging")]


def test_a_diverging_loss_stops_with_a_clear_error(tiny_dirs, tokenized):
    trainer = make_trainer(tiny_dirs, tokenized, TrainConfig(lora=LORA, max_steps=3, batch_size=2))
    with torch.no_grad():
        next(iter(trainer.engine.params.values())).fill_(float("nan"))
        for name, param in trainer.engine.params.items():
            if "lora_B" in name:
                param.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="loss became nan at step 1; lower the learning rate"):
        trainer.run()


def test_resume_reads_checkpoints_from_before_the_adapter_method_and_refuses_another_method(tiny_dirs, tokenized,
                                                                                            tmp_path):
    config = TrainConfig(lora=LORA, max_steps=4, batch_size=2, checkpoint_every=2)
    events = []
    make_trainer(tiny_dirs, tokenized, config, tmp_path, events,
                 should_cancel=lambda: len(step_losses(events)) >= 2).run()
    state_file = list_checkpoints(tmp_path)[-1] / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["settings"]["lora"]["method"] == "lora"
    del state["settings"]["lora"]["method"]  # as a checkpoint from before the method was recorded
    state_file.write_text(json.dumps(state))
    assert make_trainer(tiny_dirs, tokenized, config, tmp_path).run(resume_from=tmp_path).step == 4

    loha = TrainConfig(lora=LoraSettings(method="loha", r=LORA.r, alpha=LORA.alpha, dropout=LORA.dropout),
                       max_steps=4, batch_size=2)
    with pytest.raises(ValueError, match="written with lora=.*'method': 'lora'.*this run has lora=.*'method': 'loha'"):
        make_trainer(tiny_dirs, tokenized, loha, tmp_path).run(resume_from=tmp_path)
