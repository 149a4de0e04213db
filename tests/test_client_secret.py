"""The run's seed stays with the data owner, and each run has a key of its own: what a real trunk server
receives, captured on the wire by a recording proxy in front of it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from splitcore import LoraSettings
from splitcore.cli.main import main
from splitcore.data.formats import load_dataset_file
from splitcore.privacy import ClientSecret, PrivacySettings
from splitcore.remote.client import TrunkClient
from splitcore.training import SplitEngine, SplitTrainer, StepMetrics, TrainConfig
from splitcore.training.batches import prepare_training_data
from splitcore.training.checkpoints import read_checkpoint_state

SEED = 86753090


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

    parsed = [(name, message) for name in ("Info", "OpenSession", "Forward", "Backward", "Step", "ExportState",
                                           "ImportState", "CloseSession") for message in proxy.calls(name)]
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


def test_a_nonce_makes_a_key_of_its_own_and_the_same_nonce_the_same_key():
    key = ClientSecret(bytes(range(32)))
    nonce = bytes(range(16))
    run = key.with_nonce(nonce)
    assert run.derive("purpose", 1, 2) == key.with_nonce(nonce).derive("purpose", 1, 2)
    assert run.trunk_seed(SEED) == key.with_nonce(nonce).trunk_seed(SEED)
    other = key.with_nonce(bytes(range(1, 17)))
    assert len({key.trunk_seed(SEED), run.trunk_seed(SEED), other.trunk_seed(SEED)}) == 3
    assert len({key.fingerprint(), run.fingerprint(), other.fingerprint()}) == 3
    assert run.resume_record() == {"client_secret": run.fingerprint(), "client_nonce": nonce.hex()}
    assert key.resume_record() == {"client_secret": key.fingerprint()}, "a key without a nonce records none"
    assert ClientSecret.fresh_nonce() != ClientSecret.fresh_nonce()
    with pytest.raises(ValueError, match="already has a run's nonce"):
        run.with_nonce(nonce)
    with pytest.raises(ValueError, match="at least 8 bytes"):
        key.with_nonce(b"1234")


def cli_train(tiny_dirs, address, token, key_file, out, *extra) -> int:
    """``python -m splitcore train`` in this process: 2 steps, a checkpoint after each, noise and a private Bottom."""
    data = out.parent / "data.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"text": f"line {i} of the owner's private notes"}) + "\n"
                                for i in range(8)))
    return main(["train", "--model", str(tiny_dirs["llama"]), "--data", str(data), "--out", str(out),
                 "--trunk", address, "--token", token, "--secret-file", str(key_file), "--steps", "2",
                 "--batch-size", "2", "--seq-len", "24", "--lora-r", "4", "--lora-alpha", "8",
                 "--lora-dropout", "0", "--hidden-noise", "0.5", "--private-bottom", "0.2",
                 "--checkpoint-every", "1", *extra])


def what_the_trunk_got(proxy) -> tuple[int, dict[int, torch.Tensor]]:
    """The trunk seed the run's OpenSession carried and the hidden states of each training step (micro-batch 0);
    then forgets the record, for the next run."""
    (opened,) = proxy.calls("OpenSession")
    hidden = {request.step: values for request, values in proxy.hidden_states()
              if not request.evaluate and request.micro_batch == 0}
    proxy.clear()
    assert opened.dropout_seed == opened.lora.seed
    return opened.lora.seed, hidden


def bottom_lora_b(out) -> torch.Tensor:
    weights = load_file(str(out / "adapter_model.safetensors"))
    return torch.cat([value.flatten() for key, value in sorted(weights.items())
                      if ".layers.0." in key and "lora_B" in key])


def test_cli_runs_mix_a_fresh_nonce_into_the_key_file_and_a_resume_reuses_it(tiny_dirs, proxied_trunk, tmp_path,
                                                                              capsys):
    proxy, address, token = proxied_trunk
    key_file = tmp_path / "client-secret"
    first, second = tmp_path / "first", tmp_path / "second"
    assert cli_train(tiny_dirs, address, token, key_file, first) == 0
    first_seed, first_hidden = what_the_trunk_got(proxy)
    assert cli_train(tiny_dirs, address, token, key_file, second) == 0
    second_seed, second_hidden = what_the_trunk_got(proxy)

    # The same key file and seed, yet nothing shared: trunk seed, noise, private Bottom.
    assert first_seed != second_seed
    assert first_hidden.keys() == second_hidden.keys() == {1, 2}
    assert not torch.allclose(first_hidden[1], second_hidden[1])
    assert not torch.equal(bottom_lora_b(first), bottom_lora_b(second))
    nonce = read_checkpoint_state(first / "checkpoints").settings["client_nonce"]
    assert json.loads((first / "training_args.json").read_text())["key_nonce"] == nonce
    assert nonce != read_checkpoint_state(second / "checkpoints").settings["client_nonce"]

    # A resume takes the checkpoint's nonce: the same trunk seed, and step 2 sends what it sent the first time.
    resume = ("--resume", str(first / "checkpoints" / "step-00000001"))
    assert cli_train(tiny_dirs, address, token, key_file, first, *resume) == 0
    resumed_seed, resumed_hidden = what_the_trunk_got(proxy)
    assert resumed_seed == first_seed
    assert resumed_hidden.keys() == {2} and torch.equal(resumed_hidden[2], first_hidden[2])

    # --key-nonce repeats a run from the start; another key file is refused on resume.
    assert cli_train(tiny_dirs, address, token, key_file, tmp_path / "again", "--key-nonce", nonce) == 0
    again_seed, again_hidden = what_the_trunk_got(proxy)
    assert again_seed == first_seed and torch.equal(again_hidden[1], first_hidden[1])
    capsys.readouterr()
    assert cli_train(tiny_dirs, address, token, tmp_path / "another-key", first, *resume) == 2
    assert "written with another client secret" in capsys.readouterr().err
    assert cli_train(tiny_dirs, address, token, key_file, first, *resume, "--key-nonce", "00" * 16) == 2
    assert "a resumed run keeps its own nonce" in capsys.readouterr().err

    key = key_file.read_text().strip()
    printed = capsys.readouterr()
    assert key not in printed.out + printed.err
    assert all(key.encode() not in record.payload and bytes.fromhex(key) not in record.payload
               for record in proxy.records())
