"""Split training and generation against a real trunk server process on a loopback port.

The split run must train exactly what the local (monolithic peft) run trains, survive a
trunk that dies mid-run (resume from the last checkpoint on a new trunk), and its
adapter must generate through the trunk what the unsplit model with the adapter generates.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from cli_helpers import splitcore_cli
from conftest import local_greedy_tokens, run_concurrently
from safetensors.torch import load_file
from training_helpers import SECRET, STEPS, losses_of, train_cli, trunk_args
from transformers import AutoModelForCausalLM, AutoTokenizer
from trunk_process import start_trunk

from splitcore import LoraSettings
from splitcore.data.formats import load_dataset_file
from splitcore.generation.local import GenerationSettings, encode_prompt
from splitcore.generation.split import SplitGenerator
from splitcore.model.part_loading import CheckpointModel, FrozenWeightStore
from splitcore.model.split_spec import SplitSpec
from splitcore.remote.client import RetryPolicy, TrunkClient, TrunkError
from splitcore.training import LocalEngine, SplitEngine, SplitTrainer, StepMetrics, TrainConfig
from splitcore.training.batches import prepare_training_data


@pytest.mark.parametrize("trunk_lora", [True, False], ids=["trunk-lora", "frozen-trunk"])
def test_split_training_over_grpc_equals_local_training(tiny_dirs, dataset, trunk, tmp_path, trunk_lora):
    extra = () if trunk_lora else ("--no-trunk-lora",)
    local_steps, local_val = train_cli(tiny_dirs, dataset, tmp_path / "local", "--local", extra=extra)
    split_steps, split_val = train_cli(tiny_dirs, dataset, tmp_path / "split", *trunk_args(trunk), extra=extra)

    assert [r["step"] for r in split_steps] == list(range(1, STEPS + 1))
    assert any(r["grad_norm"] > 0.5 for r in split_steps), "clipping must take part"
    for ours, theirs in zip(split_steps, local_steps, strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5), ours["step"]
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-5), ours["step"]
        assert ours["lr"] == theirs["lr"]
        assert ours["wire_bytes"] > 0 and theirs["wire_bytes"] == 0
        assert set(ours) == {"step", "loss", "lr", "grad_norm", "tokens_per_s", "wire_bytes", "elapsed_s"}
    assert split_steps[-1]["loss"] < split_steps[0]["loss"]
    assert [r["step"] for r in split_val] == [5, 10]
    assert [r["val_loss"] for r in split_val] == pytest.approx([r["val_loss"] for r in local_val], rel=1e-5)

    ours = load_file(str(tmp_path / "split" / "adapter_model.safetensors"))
    theirs = load_file(str(tmp_path / "local" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-5
    trunk_keys = [k for k in ours if any(f".layers.{i}." in k for i in (2, 3))]
    assert bool(trunk_keys) == trunk_lora
    args = json.loads((tmp_path / "split" / "training_args.json").read_text())
    assert args["mode"] == "split" and args["train_trunk_lora"] is trunk_lora and args["batch_size"] == 3


def make_run(tiny_dirs, dataset, client=None, seed=0, checkpoint_dir=None, callbacks=(), model=None):
    """A trainer of the tiny Llama; ``model``: where its weights come from (default: a freshly loaded model)."""
    config = TrainConfig(lora=LoraSettings(r=4, alpha=8, dropout=0.0), max_steps=STEPS, batch_size=3, grad_accum=2,
                         seq_len=32, learning_rate=2e-2, max_grad_norm=0.5, seed=seed, checkpoint_every=3)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    data = prepare_training_data(tokenizer, load_dataset_file(dataset).examples, config)
    model = model or AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    engine = (SplitEngine(model, config, client, secret=SECRET) if client
              else LocalEngine(model, config, SplitSpec(6, 2, 2), secret=SECRET))
    return SplitTrainer(engine, config, data, tokenizer.pad_token_id, checkpoint_dir=checkpoint_dir,
                        callbacks=callbacks)


def test_trunk_killed_mid_run_then_resumed_on_a_new_trunk_equals_an_uninterrupted_run(tiny_dirs, dataset,
                                                                                      tmp_path):
    straight = []
    make_run(tiny_dirs, dataset, callbacks=[straight.append]).run()

    doomed = start_trunk(tiny_dirs["llama"], tmp_path)
    before = []

    def kill_after_step_5(event):
        before.append(event)
        if isinstance(event, StepMetrics) and event.step == 5:
            doomed.process.kill()  # SIGKILL: no goodbye to the client
            doomed.process.wait()

    fast_fail = RetryPolicy(attempts=2, initial_backoff_s=0.1)
    with TrunkClient(doomed.address, doomed.token, retry=fast_fail) as client:
        with pytest.raises(TrunkError, match="UNAVAILABLE"):
            make_run(tiny_dirs, dataset, client, checkpoint_dir=tmp_path / "ckpt",
                     callbacks=[kill_after_step_5]).run()
    assert max(losses_of(before)) == 5

    fresh = start_trunk(tiny_dirs["llama"], tmp_path)
    try:
        after = []
        with TrunkClient(fresh.address, fresh.token) as client:
            trainer = make_run(tiny_dirs, dataset, client, checkpoint_dir=tmp_path / "ckpt",
                               callbacks=[after.append])
            result = trainer.run(resume_from=tmp_path / "ckpt")
            assert sorted(losses_of(after)) == list(range(4, STEPS + 1)), "resumed from the step-3 checkpoint"
            trainer.export_adapter(tmp_path / "adapter", str(tiny_dirs["llama"]))
    finally:
        fresh.stop()
    expected = losses_of(straight)
    assert result.status == "completed" and result.step == STEPS
    assert result.loss == pytest.approx(expected[STEPS], rel=1e-5)
    for step, loss in losses_of(after).items():
        assert loss == pytest.approx(expected[step], rel=1e-5), step


def test_two_concurrent_split_runs_on_one_trunk_each_equal_their_local_runs(tiny_dirs, dataset, trunk):
    """As in a web worker: both runs' frozen Bottom and Top weights are one copy, from one store."""
    local = {}
    for seed in (1, 2):
        events = []
        make_run(tiny_dirs, dataset, seed=seed, callbacks=[events.append]).run()
        local[seed] = losses_of(events)
    worker_model = CheckpointModel(tiny_dirs["llama"], store=FrozenWeightStore())
    clients = {seed: TrunkClient(trunk.address, trunk.token) for seed in (1, 2)}
    events = {seed: [] for seed in (1, 2)}
    trainers = {seed: make_run(tiny_dirs, dataset, clients[seed], seed=seed, callbacks=[events[seed].append],
                               model=worker_model)
                for seed in (1, 2)}
    frozen = {seed: {name.split("base_layer.")[0] + name.rsplit(".", 1)[-1]: p.data_ptr()
                     for part in (trainers[seed].engine.bottom, trainers[seed].engine.top)
                     for name, p in part.named_parameters() if not p.requires_grad}
              for seed in (1, 2)}
    assert frozen[1] and frozen[1] == frozen[2], "one copy of every frozen tensor"
    adapters = {seed: {p.data_ptr() for p in trainers[seed].engine.params.values()} for seed in (1, 2)}
    assert adapters[1].isdisjoint(adapters[2]), "each run trains its own adapter"
    assert max(worker_model.checkpoint.keys_read.values()) == 1, "each frozen tensor read once for both runs"
    trunk_blocks = SplitSpec(6, 2, 2).trunk_layers
    assert not [key for key in worker_model.checkpoint.keys_read if any(f".layers.{i}." in key for i in trunk_blocks)]
    def work(seed):
        with clients[seed]:
            trainers[seed].run()

    errors = run_concurrently({seed: (lambda seed=seed: work(seed)) for seed in (1, 2)})
    assert not errors, errors
    assert local[1] != local[2]
    split = {seed: losses_of(events[seed]) for seed in (1, 2)}
    for seed in (1, 2):
        assert list(split[seed]) == list(range(1, STEPS + 1))
        assert [split[seed][s] for s in split[seed]] == pytest.approx([local[seed][s] for s in split[seed]],
                                                                      rel=1e-5)


def test_a_bf16_client_trains_fp32_adapters_close_to_the_fp32_run(tiny_dirs, dataset, trunk):
    """WORKER_DTYPE / --dtype bf16: the frozen Bottom and Top in bf16, the adapters and AdamW in fp32."""
    reference = []
    make_run(tiny_dirs, dataset, callbacks=[reference.append]).run()
    events = []
    with TrunkClient(trunk.address, trunk.token) as client:
        trainer = make_run(tiny_dirs, dataset, client, callbacks=[events.append],
                           model=CheckpointModel(tiny_dirs["llama"], dtype=torch.bfloat16))
        frozen = [p for part in (trainer.engine.bottom, trainer.engine.top) for p in part.parameters()
                  if not p.requires_grad]
        assert frozen and {p.dtype for p in frozen} == {torch.bfloat16}
        assert {p.dtype for p in trainer.engine.params.values()} == {torch.float32}
        trainer.run()
    ours, theirs = losses_of(events), losses_of(reference)
    assert list(ours) == list(range(1, STEPS + 1))
    assert ours[STEPS] < ours[1], "it learns"
    for step in ours:
        assert ours[step] == pytest.approx(theirs[step], rel=0.03), step


def test_split_generation_gives_the_greedy_tokens_of_the_unsplit_model_with_the_adapter(tiny_dirs, dataset, trunk,
                                                                                        tmp_path):
    train_cli(tiny_dirs, dataset, tmp_path / "run", *trunk_args(trunk))
    adapter = tmp_path / "run"
    model_dir = tiny_dirs["llama"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    settings = GenerationSettings(max_new_tokens=12)
    prompt = "Q: what is 4 plus 4?\nA:"
    input_ids = encode_prompt(tokenizer, prompt, chat=False)

    def local_tokens(with_adapter):
        return local_greedy_tokens(model_dir, input_ids, tokenizer.pad_token_id, 12,
                                   adapter if with_adapter else None)

    with TrunkClient(trunk.address, trunk.token) as client:
        split_adapted = list(SplitGenerator.from_directory(model_dir, client, adapter).generate(input_ids, tokenizer, settings))
        split_base = list(SplitGenerator.from_directory(model_dir, client).generate(input_ids, tokenizer, settings))
    assert split_adapted == local_tokens(True)
    assert split_base == local_tokens(False)
    assert split_adapted != split_base, "the adapter must change the answer for the comparison to mean something"

    env_token = {**os.environ, "TRUNK_TOKEN": trunk.token}
    result = splitcore_cli("generate", "--model", str(model_dir), "--adapter", str(adapter), "--prompt", prompt,
                           "--max-new-tokens", "12", "--trunk", trunk.address, env=env_token)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.rstrip("\n") == tokenizer.decode(split_adapted, skip_special_tokens=True)


def test_train_cli_reports_what_is_wrong(tiny_dirs, dataset, trunk, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a" "completion": "b"}\n')
    common = ("train", "--model", str(tiny_dirs["llama"]), "--out", str(tmp_path / "out"), "--steps", "1")
    cases = [
        ((*common, "--data", str(bad), "--local"), "bad.jsonl: line 2: invalid JSON"),
        ((*common, "--data", str(dataset), "--local", "--trunk", trunk.address), "either --trunk HOST:PORT (HOST:PORT,HOST:PORT,... for a chain of trunks) or --local"),
        ((*common, "--data", str(dataset), "--trunk", "no-port"), "--trunk must be HOST:PORT"),
        ((*common, "--data", str(dataset), "--trunk", trunk.address, "--token", "not-the-token"),
         "UNAUTHENTICATED"),
        ((*common, "--data", str(dataset), "--local", "--lora-r", "0"), "LoRA rank r must be an integer"),
        ((*common, "--data", str(dataset), "--local", "--resume", str(tmp_path)), "holds no step-* checkpoint"),
        (("train", "--model", str(tiny_dirs["gpt2"]), "--out", str(tmp_path / "out"), "--steps", "1",
          "--data", str(dataset), "--trunk", trunk.address, "--token", trunk.token),
         "serves a llama model; this model is gpt2"),
    ]
    for args, message in cases:
        result = splitcore_cli(*args)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert message in result.stderr, (message, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_train_cli_says_when_the_examples_trained_in_the_chat_template(tiny_dirs, dataset, tmp_path):
    plain = tmp_path / "no-template"
    plain.mkdir()
    for source in tiny_dirs["llama"].iterdir():
        if source.name != "chat_template.jinja":
            (plain / source.name).symlink_to(source)
    note = "the examples trained in the chat template of {}; ask the adapter the same way: generate --chat"
    for model_dir, says in ((tiny_dirs["llama"], True), (plain, False)):
        result = splitcore_cli("train", "--model", str(model_dir), "--data", str(dataset), "--out",
                               str(tmp_path / model_dir.name), "--steps", "1", "--local")
        assert result.returncode == 0, result.stderr[-2000:]
        assert (note.format(model_dir.name) in result.stderr) is says, result.stderr[-2000:]
    assert "chat template" not in result.stderr


def test_train_cli_resume_rewrites_the_metrics_after_the_checkpoint(tiny_dirs, dataset, tmp_path):
    out = tmp_path / "run"
    steps, _ = train_cli(tiny_dirs, dataset, out, "--local", extra=("--checkpoint-every", "4"))
    metrics = out / "metrics.jsonl"
    full = metrics.read_text()
    adapter = load_file(str(out / "adapter_model.safetensors"))
    resumed_steps, _ = train_cli(tiny_dirs, dataset, out, "--local",
                                 extra=("--checkpoint-every", "4", "--resume", str(out / "checkpoints" / "step-00000008")))
    assert [r["step"] for r in resumed_steps] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in resumed_steps] == pytest.approx([r["loss"] for r in steps], rel=1e-5)
    assert len(metrics.read_text().splitlines()) == len(full.splitlines())
    resumed = load_file(str(out / "adapter_model.safetensors"))
    assert resumed.keys() == adapter.keys()
    assert max((resumed[k] - adapter[k]).abs().max().item() for k in adapter) <= 1e-6
