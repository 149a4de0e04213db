"""A chain of trunks: the trunk's blocks on several real trunk server processes, each a link
running its own range (``trunk_server --layers A-B``) with its own session and LoRA.

Chains of 2 and 3 links train exactly what the local run at the same cut trains (Llama and
GPT-2 layouts); the client refuses a gap, an overlap or a link of another model before
training; a link killed mid-run resumes on a replacement and ends like the uninterrupted run;
generation through a chain gives the unsplit model's greedy tokens.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli_helpers import splitcore_cli
from conftest import local_greedy_tokens
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer
from trunk_process import start_trunk

from splitcore import LoraSettings
from splitcore.data.formats import load_dataset_file
from splitcore.generation.local import GenerationSettings, encode_prompt
from splitcore.generation.split import SplitGenerator
from splitcore.model.part_loading import CheckpointModel
from splitcore.model.split_spec import CutBounds, SplitSpec, plan_chain
from splitcore.privacy import ClientSecret, PrivacySettings
from splitcore.remote import state as trunk_state
from splitcore.remote.chain import join_states, split_state
from splitcore.remote.client import RetryPolicy, TrunkClient, TrunkError
from splitcore.training import LocalEngine, SplitEngine, SplitTrainer, StepMetrics, TrainConfig
from splitcore.training.batches import prepare_training_data
from trunk_server.config import TrunkServerConfig
from trunk_server.host import TrunkHost

STEPS = 6
SECRET = ClientSecret(bytes(range(32)))
# The tiny models have 6 blocks. Links by name, and the chains (cut: blocks kept before, after) built of them.
LINK_RANGES = {"a": "1-2", "b": "3-3", "c": "4-4"}
CHAINS = {2: (("a", "b"), (1, 2)), 3: (("a", "b", "c"), (1, 1))}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "arithmetic.jsonl"
    rows = [{"prompt": f"Q: what is {i} plus {i}?\nA:", "completion": f" {2 * i}"} for i in range(24)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def links(tiny_dirs, tmp_path_factory):
    """Trunk processes by (arch, link name), started on first use and stopped with the module."""
    logs = tmp_path_factory.mktemp("chain-logs")
    started = {}

    def link(arch: str, name: str):
        if (arch, name) not in started:
            started[arch, name] = start_trunk(tiny_dirs[arch], logs, layers=LINK_RANGES[name])
        return started[arch, name]

    yield link
    for process in started.values():
        process.stop()


def clients_of(processes, retry: RetryPolicy = RetryPolicy()) -> list[TrunkClient]:
    return [TrunkClient(p.address, p.token, retry=retry) for p in processes]


def config_for(cut, checkpoint_every: int = 0) -> TrainConfig:
    return TrainConfig(lora=LoraSettings(r=4, alpha=8, dropout=0.0), max_steps=STEPS, batch_size=3, grad_accum=2,
                       seq_len=32, learning_rate=2e-2, max_grad_norm=0.5, seed=0, val_fraction=0.2, eval_every=3,
                       checkpoint_every=checkpoint_every,
                       privacy=PrivacySettings(bottom_layers=cut[0], top_layers=cut[1]))


def trainer_for(model_dir, dataset, config, clients=None, checkpoint_dir=None, callbacks=()):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = prepare_training_data(tokenizer, load_dataset_file(dataset).examples, config)
    model = CheckpointModel(model_dir)
    cut = config.privacy
    engine = (SplitEngine(model, config, clients, secret=SECRET) if clients is not None
              else LocalEngine(model, config, SplitSpec(model.num_layers, cut.bottom_layers, cut.top_layers),
                               secret=SECRET))
    return SplitTrainer(engine, config, data, tokenizer.pad_token_id, checkpoint_dir=checkpoint_dir,
                        callbacks=list(callbacks))


def run(trainer, tmp_path, name):
    events = []
    trainer.callbacks.append(events.append)
    result = trainer.run()
    trainer.export_adapter(tmp_path / name, "base")
    trainer.engine.close()
    return result, events, load_file(str(tmp_path / name / "adapter_model.safetensors"))


def losses_of(events):
    return {e.step: e.loss for e in events if isinstance(e, StepMetrics)}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("length", [2, 3])
def test_a_chain_trains_exactly_what_the_local_run_at_the_same_cut_trains(tiny_dirs, dataset, links, tmp_path,
                                                                          arch, length):
    names, cut = CHAINS[length]
    model_dir = tiny_dirs[arch]
    config = config_for(cut)
    _, local_events, local_adapter = run(trainer_for(model_dir, dataset, config), tmp_path, "local")
    clients = clients_of([links(arch, name) for name in names])
    trainer = trainer_for(model_dir, dataset, config, clients)
    engine = trainer.engine
    assert [link.layers for link in engine.links] == [range(1, 3), range(3, 4), range(4, 5)][:length]
    result, chain_events, chain_adapter = run(trainer, tmp_path, "chain")

    local, chain = losses_of(local_events), losses_of(chain_events)
    assert list(chain) == list(range(1, STEPS + 1)) and result.step == STEPS
    for step in chain:
        assert chain[step] == pytest.approx(local[step], rel=1e-5, abs=1e-6), step
    assert chain[STEPS] < chain[1], "it learns"
    assert result.val_loss == pytest.approx(trainer_val(local_events), rel=1e-5)
    assert chain_adapter.keys() == local_adapter.keys()
    assert max((chain_adapter[k] - local_adapter[k]).abs().max().item() for k in chain_adapter) <= 1e-5
    marker = ".h." if arch == "gpt2" else ".layers."
    for block in range(1, 6 - cut[1]):  # every link trained LoRA on each of its blocks
        trained = [k for k in chain_adapter if f"{marker}{block}." in k and "lora_B" in k]
        assert trained and any(chain_adapter[k].abs().max() > 0 for k in trained), block
    sent = engine.wire_bytes_by_link()
    assert len(sent) == length and all(count > 0 for count in sent)


def trainer_val(events):
    return [e for e in events if type(e).__name__ == "EvalMetrics"][-1].val_loss


def test_a_gap_an_overlap_or_a_link_of_another_model_is_refused_before_training(tiny_dirs, dataset, links,
                                                                                 tmp_path):
    model_dir = tiny_dirs["llama"]
    a, b, c = (links("llama", name) for name in ("a", "b", "c"))
    config = config_for((1, 1))

    def refused(processes, message):
        clients = clients_of(processes)
        with pytest.raises(ValueError) as error:
            trainer_for(model_dir, dataset, config, clients)
        assert message in str(error.value), str(error.value)
        for client in clients:  # no session was left open on any link
            assert client.info().active_sessions == 0
            client.close()
        return str(error.value)

    gap = refused([a, c], "a gap in the chain: no link serves block 3 after link 1")
    assert f"link 2 ({c.address}) block 4" in gap
    refused([a, b], "no link serves block 4 after link 2")
    wide = start_trunk(model_dir, tmp_path, layers="1-3")
    try:
        overlap = refused([wide, b, c], "an overlap in the chain: link 1")
        assert "both serve block 3" in overlap
    finally:
        wide.stop()
    refused([a, links("gpt2", "b"), c], "link 2 (")  # a link of another architecture: refused from its Info

    # Same architecture, other weights: refused once the link's session reports its fingerprint; the
    # sessions already opened on the links before it are closed.
    other = tmp_path / "other-llama"
    shutil.copytree(model_dir, other)
    weights = load_file(str(other / "model.safetensors"))
    key = next(k for k in weights if ".layers.3." in k)
    weights[key] = weights[key] + 0.01
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    impostor = start_trunk(other, tmp_path, layers="3-3")
    try:
        message = refused([a, impostor, c], "with different weights than this model's")
        assert message.startswith(f"link 2 ({impostor.address})")
    finally:
        impostor.stop()


def test_a_link_killed_mid_run_resumes_on_a_replacement_and_ends_like_the_uninterrupted_run(tiny_dirs, dataset,
                                                                                            links, tmp_path):
    model_dir = tiny_dirs["llama"]
    config = config_for((1, 2), checkpoint_every=2)
    straight = []
    trainer_for(model_dir, dataset, config, callbacks=[straight.append]).run()

    doomed = start_trunk(model_dir, tmp_path, layers="3-3")
    first = links("llama", "a")
    before = []

    def kill_after_step_3(event):
        before.append(event)
        if isinstance(event, StepMetrics) and event.step == 3:
            doomed.process.kill()  # SIGKILL: no goodbye to the client
            doomed.process.wait()

    fast_fail = RetryPolicy(attempts=2, initial_backoff_s=0.1)
    clients = clients_of([first, doomed], retry=fast_fail)
    trainer = trainer_for(model_dir, dataset, config, clients, tmp_path / "ckpt", [kill_after_step_3])
    with pytest.raises(TrunkError, match="UNAVAILABLE") as lost:
        trainer.run()
    assert lost.value.trunk == doomed.address, "the error names the link that was lost"
    trainer.engine.close()
    assert max(losses_of(before)) == 3

    replacement = start_trunk(model_dir, tmp_path, layers="3-3")
    try:
        after = []
        trainer = trainer_for(model_dir, dataset, config, clients_of([first, replacement]), tmp_path / "ckpt",
                              [after.append])
        result = trainer.run(resume_from=tmp_path / "ckpt")
        trainer.engine.close()
    finally:
        replacement.stop()
    assert sorted(losses_of(after)) == list(range(3, STEPS + 1)), "resumed from the step-2 checkpoint"
    expected = losses_of(straight)
    assert result.status == "completed" and result.loss == pytest.approx(expected[STEPS], rel=1e-5)
    for step, loss in losses_of(after).items():
        assert loss == pytest.approx(expected[step], rel=1e-5), step


def test_a_chain_checkpoint_resumes_on_a_single_trunk_with_the_same_cut(tiny_dirs, dataset, links, tmp_path):
    """The checkpoint's trunk state is every link's state by full-model key, so it splits back by block."""
    model_dir = tiny_dirs["llama"]
    config = config_for((1, 2), checkpoint_every=2)
    straight = []
    trainer_for(model_dir, dataset, config, callbacks=[straight.append]).run()
    stopped = []
    chain = trainer_for(model_dir, dataset, config, clients_of([links("llama", "a"), links("llama", "b")]),
                        tmp_path / "ckpt", [stopped.append])
    chain.should_cancel = lambda: any(isinstance(e, StepMetrics) and e.step == 4 for e in stopped)
    assert chain.run().status == "cancelled"
    chain.engine.close()

    single = start_trunk(model_dir, tmp_path, n_bottom=1, n_top=2)
    try:
        after = []
        trainer = trainer_for(model_dir, dataset, config, clients_of([single]), tmp_path / "ckpt", [after.append])
        result = trainer.run(resume_from=tmp_path / "ckpt")
        trainer.engine.close()
    finally:
        single.stop()
    expected = losses_of(straight)
    assert sorted(losses_of(after)) == list(range(5, STEPS + 1))
    assert result.loss == pytest.approx(expected[STEPS], rel=1e-5)


def test_the_trunk_state_of_a_chain_splits_back_by_block():
    marker = ".layers."
    adapter = {f"base_model.model.model.layers.{i}.mlp.up_proj.lora_A.weight": torch.full((2, 3), float(i))
               for i in (1, 2, 3)}
    optimizer = {f"optimizer.model.layers.{i}.mlp.up_proj.lora_A.weight.exp_avg": torch.zeros(2, 3) for i in (1, 2, 3)}
    whole = trunk_state.pack(adapter, optimizer)
    parts = split_state(whole, [range(1, 3), range(3, 4)], marker)
    first, second = (trunk_state.unpack(part) for part in parts)
    assert sorted(first.adapter) == sorted(adapter)[:2] and len(first.optimizer) == 2
    assert list(second.adapter) == [sorted(adapter)[2]] and len(second.optimizer) == 1
    joined = trunk_state.unpack(join_states(parts))
    assert joined.adapter.keys() == adapter.keys() and joined.optimizer.keys() == optimizer.keys()
    with pytest.raises(ValueError, match=r"of block 3, which no link of this run runs \(the links run blocks 1-2\)"):
        split_state(whole, [range(1, 3)], marker)


def test_plan_chain_assigns_each_link_its_part_of_the_cut():
    def served(first, last):
        return CutBounds(num_layers=12, default=range(first, last + 1), lowest=first, highest=last + 1)

    plan = plan_chain([served(1, 4), served(5, 8), served(9, 10)], names=["x", "y", "z"])
    assert plan.spec == SplitSpec(12, 1, 1) and plan.layers == (range(1, 5), range(5, 9), range(9, 11))
    # A deeper cut: the first link runs only the part of its blocks the cut sends to the trunk.
    plan = plan_chain([served(1, 4), served(5, 8)], n_bottom=3, n_top=3)
    assert plan.layers == (range(3, 5), range(5, 9))
    with pytest.raises(ValueError, match="link 2 serves blocks 9-10, none of the trunk's blocks 3-8"):
        plan_chain([served(1, 4), served(9, 10)], n_bottom=3, n_top=3)
    with pytest.raises(ValueError, match="different depths"):
        plan_chain([served(1, 4), CutBounds(num_layers=24, default=range(5, 9), lowest=5, highest=9)])


def test_train_and_generate_over_a_chain_from_the_command_line(tiny_dirs, dataset, links, tmp_path):
    """Each link with its own token (one --token-file per link), then generation through the chain gives the
    unsplit model's greedy tokens with the adapter."""
    model_dir = tiny_dirs["llama"]
    a, b, c = (links("llama", name) for name in ("a", "b", "c"))
    token_files = []
    for process in (a, b, c):
        token_files.append(tmp_path / f"token-{process.pid}")
        token_files[-1].write_text(process.token)
    chain = ("--trunk", f"{a.address},{b.address},{c.address}",
             "--token-file", ",".join(str(path) for path in token_files))
    out = tmp_path / "run"
    result = splitcore_cli("train", "--model", str(model_dir), "--data", str(dataset), "--out", str(out), *chain,
                           "--steps", "4", "--batch-size", "4", "--seq-len", "32", "--lr", "5e-2",
                           "--lora-r", "4", "--lora-dropout", "0", "--bottom-layers", "1", "--top-layers", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert all(any(f".layers.{i}." in k for k in adapter) for i in range(6)), "every block's LoRA is in the adapter"

    result = splitcore_cli("train", "--model", str(model_dir), "--data", str(dataset), "--out", str(tmp_path / "x"),
                           "--trunk", f"{a.address},{b.address}", "--token-file", ",".join(map(str, token_files)),
                           "--steps", "1")
    assert result.returncode == 2 and "--token-file has 3 values for a chain of 2 trunks" in result.stderr

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = "Q: what is 4 plus 4?\nA:"
    input_ids = encode_prompt(tokenizer, prompt, chat=False)
    expected = local_greedy_tokens(model_dir, input_ids, tokenizer.pad_token_id, 12, out)
    clients = clients_of([a, b, c])
    generator = SplitGenerator.from_directory(model_dir, clients, out, n_bottom=1, n_top=1)
    assert generator.link_layers == (range(1, 3), range(3, 4), range(4, 5))
    tokens = list(generator.generate(input_ids, tokenizer, GenerationSettings(max_new_tokens=12)))
    assert tokens == expected
    base = list(SplitGenerator.from_directory(model_dir, clients, n_bottom=1, n_top=1).generate(
        input_ids, tokenizer, GenerationSettings(max_new_tokens=12)))
    assert base == local_greedy_tokens(model_dir, input_ids, tokenizer.pad_token_id, 12)
    assert tokens != base, "the adapter must change the answer for the comparison to mean something"
    assert all(client.info().active_sessions == 0 for client in clients), "every link's inference session closed"

    result = splitcore_cli("generate", "--model", str(model_dir), "--adapter", str(out), "--prompt", prompt,
                           "--max-new-tokens", "12", *chain)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.rstrip("\n") == tokenizer.decode(tokens, skip_special_tokens=True)


def test_a_trunk_started_with_layers_holds_and_serves_exactly_those_blocks(tiny_dirs, links):
    process = links("llama", "a")
    assert "(layers 1-2 of 6, sessions run any part of them;" in process.startup_line
    with TrunkClient(process.address, process.token) as client:
        info = client.info()
        assert (info.trunk_start, info.trunk_end, info.min_trunk_start, info.max_trunk_end) == (1, 3, 1, 3)
        client.open_session(None, layers=range(2, 3))  # any part of its blocks
        client.close_session()
        with pytest.raises(TrunkError, match="OUT_OF_RANGE"):
            client.open_session(None, layers=range(1, 4))
    host = TrunkHost(TrunkServerConfig(model_dir=tiny_dirs["llama"], n_bottom=None, n_top=None, token="t" * 32,
                                       layers=(3, 4)))
    held = {name for name, _ in host.trunk.named_parameters()}
    assert any(".layers.3." in name for name in held) and any(".layers.4." in name for name in held)
    assert not any(f".layers.{i}." in name for name in held for i in (0, 1, 2, 5)), "only its own blocks"
    assert not any("embed" in name or "lm_head" in name for name in held)


@pytest.mark.parametrize("options,message", [
    ({"layers": (0, 2)}, "the first must be at least 1"),
    ({"layers": (3, 2)}, "at most the last"),
    ({"layers": (1, 2), "n_bottom": 1}, "it does not go with --bottom-layers"),
    ({}, "say which blocks the trunk serves: --layers FIRST-LAST"),
])
def test_trunk_layers_are_validated_at_start_up(tiny_dirs, options, message):
    settings = {"n_bottom": None, "n_top": None, **options}
    with pytest.raises(ValueError, match=message):
        TrunkServerConfig(model_dir=tiny_dirs["llama"], token="t" * 32, **settings)


def test_a_trunk_refuses_layers_beyond_the_blocks_a_client_keeps(tiny_dirs):
    beyond = TrunkServerConfig(model_dir=tiny_dirs["llama"], n_bottom=None, n_top=None, token="t" * 32,
                               layers=(2, 5))
    with pytest.raises(ValueError, match=r"the model has 6 blocks \(0-5\) and at least the last one stays"):
        TrunkHost(beyond)
