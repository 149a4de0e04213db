"""Per-session cut depth: one trunk server process, any layer range within its operator's bounds."""

from __future__ import annotations

import grpc
import pytest
import torch
from cli_helpers import splitcore_cli
from conftest import SENTENCES, tokenize
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file
from training_helpers import train_cli
from transformers import AutoModelForCausalLM, AutoTokenizer
from trunk_process import start_trunk

from splitcore import LoraSettings, split_model
from splitcore.generation.split import SplitGenerator
from splitcore.privacy import ClientSecret, PrivacySettings
from splitcore.remote.client import TrunkClient, TrunkError
from splitcore.remote.proto import trunk_pb2 as pb
from splitcore.remote.trunk import choose_split
from splitcore.training import SplitEngine, TrainConfig

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)


@pytest.fixture(scope="module")
def wide_trunk(tiny_dirs, tmp_path_factory):
    """Default cut 2 + 2 of 6 layers; sessions may keep as few as 1 block on each side."""
    process = start_trunk(tiny_dirs["llama"], tmp_path_factory.mktemp("wide-trunk-logs"), "--max-sessions", "4",
                          "--min-bottom-layers", "1", "--min-top-layers", "1")
    yield process
    process.stop()


@pytest.fixture
def client(wide_trunk):
    with TrunkClient(wide_trunk.address, wide_trunk.token) as c:
        yield c


def test_info_advertises_the_default_cut_and_the_bounds(client):
    info = client.info()
    assert (info.trunk_start, info.trunk_end) == (2, 4)
    assert (info.min_trunk_start, info.max_trunk_end) == (1, 5)


@pytest.mark.parametrize("layers", [range(1, 5), range(3, 5), range(1, 2), range(2, 4)])
def test_a_session_runs_exactly_the_blocks_it_asked_for(client, tiny_dirs, layers):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    input_ids, mask, _ = tokenize(AutoTokenizer.from_pretrained(tiny_dirs["llama"]))
    bottom, trunk, _ = split_model(model, layers.start, 6 - layers.stop)
    with torch.no_grad():
        hidden = bottom(input_ids, mask)
        expected = trunk(hidden, mask)
    reply = client.open_session(None, layers=layers)
    assert (reply.info.trunk_start, reply.info.trunk_end) == (layers.start, layers.stop)
    remote = client.forward(1, 0, hidden, mask)
    assert (remote - expected).abs().max().item() <= 1e-5


def test_a_session_adapter_covers_only_its_own_blocks(client):
    client.open_session(LORA, layers=range(1, 3))
    _, state = client.export_state()
    layers = {int(key.split(".layers.")[1].split(".")[0]) for key in load_safetensors(state) if ".layers." in key}
    assert layers == {1, 2}


@pytest.mark.parametrize("start,end", [(0, 3), (2, 6), (3, 3), (4, 2), (0, 4)])
def test_a_range_outside_the_bounds_is_refused_with_out_of_range(wide_trunk, client, start, end):
    with pytest.raises(TrunkError) as refused:
        client.open_session(None, layers=range(start, end))
    assert refused.value.code == grpc.StatusCode.OUT_OF_RANGE
    assert "within layers 1-4 of 6" in refused.value.details
    # The server keeps serving, and the refused request left no session behind.
    assert client.info().active_sessions == 0
    client.open_session(None, layers=range(1, 5))
    assert client.info().active_sessions == 1


def test_the_client_refuses_a_cut_outside_the_bounds_before_opening_a_session(client, tiny_dirs):
    info = client.info()
    assert choose_split(info, 1, 1).trunk_layers == range(1, 5)
    assert choose_split(info, None, None).trunk_layers == range(2, 4)
    config = TrainConfig(lora=LORA, max_steps=1, privacy=PrivacySettings(bottom_layers=1, top_layers=None))
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    SplitEngine(model, config, client).close()
    bounded = pb.InfoResponse(model_id="m", num_layers=8, trunk_start=2, trunk_end=6, min_trunk_start=2,
                              max_trunk_end=6)
    with pytest.raises(ValueError, match="keep at least 2 blocks on this machine before it and 2 after it; "
                                         "this run keeps 1 before and 2 after"):
        choose_split(bounded, 1, None)
    too_deep = TrainConfig(lora=LORA, max_steps=1, privacy=PrivacySettings(bottom_layers=5, top_layers=1))
    with pytest.raises(ValueError, match="leaves no layer for the Trunk"):
        SplitEngine(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]), too_deep, client)
    assert client.info().active_sessions == 0


def test_a_default_only_trunk_refuses_another_cut(tiny_dirs, tmp_path):
    """A trunk started without --min-*-layers serves its default cut only."""
    process = start_trunk(tiny_dirs["llama"], tmp_path)
    try:
        with TrunkClient(process.address, process.token) as narrow:
            info = narrow.info()
            assert (info.min_trunk_start, info.max_trunk_end) == (2, 4)
            with pytest.raises(ValueError, match="within 2-3 of 6"):
                choose_split(info, 1, 2)
            with pytest.raises(TrunkError) as refused:
                narrow.open_session(None, layers=range(1, 4))
            assert refused.value.code == grpc.StatusCode.OUT_OF_RANGE
    finally:
        process.stop()


@pytest.mark.parametrize("trunk_lora", [True, False], ids=["trunk-lora", "frozen-trunk"])
def test_split_training_at_a_chosen_cut_equals_local_training_at_that_cut(tiny_dirs, dataset, wide_trunk,  # noqa: F811
                                                                          tmp_path, trunk_lora):
    cut = ("--bottom-layers", "1", "--top-layers", "1", "--secret-file", str(tmp_path / "key"))
    extra = cut + (() if trunk_lora else ("--no-trunk-lora",))
    local_steps, local_val = train_cli(tiny_dirs, dataset, tmp_path / "local", "--local", extra=extra)
    split_steps, split_val = train_cli(tiny_dirs, dataset, tmp_path / "split", "--trunk", wide_trunk.address,
                                       "--token", wide_trunk.token, extra=extra)
    assert [r["loss"] for r in split_steps] == pytest.approx([r["loss"] for r in local_steps], rel=1e-5)
    assert [r["val_loss"] for r in split_val] == pytest.approx([r["val_loss"] for r in local_val], rel=1e-5)
    ours = load_file(str(tmp_path / "split" / "adapter_model.safetensors"))
    theirs = load_file(str(tmp_path / "local" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-5
    layers = {int(k.split(".layers.")[1].split(".")[0]) for k in ours}
    assert layers == ({0, 1, 2, 3, 4, 5} if trunk_lora else {0, 5})


def test_split_generation_at_a_chosen_cut_gives_the_unsplit_greedy_tokens(tiny_dirs, client):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    prompt = tokenizer(SENTENCES[1], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    generator = SplitGenerator.from_directory(tiny_dirs["llama"], client, n_bottom=1, n_top=1)
    assert generator.layers == range(1, 5)
    from splitcore.generation.local import GenerationSettings

    tokens = list(generator.generate(prompt, tokenizer, GenerationSettings(max_new_tokens=8, temperature=0)))
    assert tokens == expected[0, prompt.shape[1]:].tolist()[:len(tokens)]
    assert len(tokens) >= 1


def test_the_cli_secret_file_is_created_once_and_private(tmp_path):
    path = tmp_path / "dir" / "key"
    first, again = ClientSecret.load_or_create(path), ClientSecret.load_or_create(path)
    assert first.fingerprint() == again.fingerprint()
    assert path.stat().st_mode & 0o077 == 0
    path.write_text("not hex\n")
    with pytest.raises(ValueError, match="hex digits"):
        ClientSecret.load_or_create(path)
    result = splitcore_cli("train", "--model", "unused", "--data", "unused", "--out", str(tmp_path / "o"),
                           "--local", "--hidden-noise", "-1")
    assert result.returncode != 0 and "hidden_noise must be a number from 0" in result.stderr
