"""Every adapter method a job can use (LoRA with DoRA or rsLoRA, LoHa, LoKr, IA3) splits exactly.

For each: the split parts' gradients equal the monolithic peft model's, the three parts export
as one ordinary adapter of that method that loads with ``PeftModel.from_pretrained``, and a split
run over a real trunk server trains what the local run trains. Methods that cannot be split are
refused with the reason.
"""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import splitcore_cli
from conftest import local_greedy_tokens, run_concurrently, tokenize
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from split_helpers import run_split, split_backward
from training_helpers import SECRET, STEPS, losses_of
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

from splitcore import (
    LoraSettings,
    add_lora,
    export_parts_adapter,
    family_for,
    init_lora_weights,
    positions_from_mask,
    split_model,
)
from splitcore.data.formats import load_dataset_file
from splitcore.generation.local import GenerationSettings, encode_prompt
from splitcore.generation.split import SplitGenerator
from splitcore.model.adapter_export import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from splitcore.model.lora import ADAPTER_METHODS, PEFT_TYPES, UNSPLITTABLE_METHODS, check_method
from splitcore.model.split_spec import SplitSpec
from splitcore.privacy import PrivacySettings
from splitcore.remote.client import TrunkClient
from splitcore.training import LocalEngine, SplitEngine, SplitTrainer, TrainConfig
from splitcore.training.batches import prepare_training_data

METHODS = {
    "lora-dora": LoraSettings(r=4, alpha=8, dropout=0.0, use_dora=True),
    "lora-rslora": LoraSettings(r=4, alpha=8, dropout=0.0, use_rslora=True),
    "loha": LoraSettings(method="loha", r=4, alpha=8, dropout=0.0),
    "lokr": LoraSettings(method="lokr", r=4, alpha=8, dropout=0.0),
    "ia3": LoraSettings(method="ia3"),
}
# GPT-2's projections are Conv1D: peft's LoHa and LoKr adapt linear layers only.
CASES = ([("llama", name) for name in METHODS] + [("gpt2", "lora-dora"), ("gpt2", "ia3")]
         + [(arch, name) for arch in ("qwen3", "gemma2", "gemma3", "phi3") for name in ("loha", "ia3")])


def canonical(name: str) -> str:
    """A parameter's path in the full model, without peft's wrapper prefix and adapter name."""
    return ".".join(p for p in name.removeprefix("base_model.model.").split(".") if p != "default")


@torch.no_grad()
def perturb_adapter(model: torch.nn.Module, seed: int = 3, scale: float = 0.1) -> None:
    """Move every adapter weight away from its start (B = 0, IA3 = 1) by a value fixed by its path, so every
    weight gets a gradient and the adapter changes the output; the same in parts and in the whole model."""
    for name, param in model.named_parameters():
        if param.requires_grad:
            generator = torch.Generator().manual_seed(seed + sum(map(ord, canonical(name))))
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {canonical(n): p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch,method", CASES, ids=[f"{a}-{m}" for a, m in CASES])
def test_split_gradients_equal_monolithic_peft_for_each_method(load_model, arch, method):
    settings = METHODS[method]
    model, tokenizer = load_model(arch)
    family = family_for(model.config)
    input_ids, attention_mask, labels = tokenize(tokenizer, "right")

    mono = get_peft_model(model, settings.peft_config(family, task_type="CAUSAL_LM"))
    init_lora_weights(mono, seed=7)
    perturb_adapter(mono)
    mono_loss = mono(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    mono_loss.backward()
    expected = grads(mono)

    split_source, _ = load_model(arch)
    parts = [add_lora(part, family, settings, seed=7) for part in split_model(split_source, 2, 2)]
    for part in parts:
        perturb_adapter(part)
    split_loss = split_backward(parts, input_ids, attention_mask, labels)
    got = {}
    for part in parts:
        got.update(grads(part))

    assert got.keys() == expected.keys() and expected
    assert abs(split_loss.item() - mono_loss.item()) <= 1e-5
    for key, value in expected.items():
        assert value.abs().max() > 0, f"{key} got no gradient"
        diff = (got[key] - value).abs().max().item()
        assert diff <= 1e-5 * max(1.0, value.abs().max().item()), f"{key}: gradient differs by {diff}"


@pytest.mark.parametrize("arch,method", CASES, ids=[f"{a}-{m}" for a, m in CASES])
def test_parts_export_one_adapter_of_the_method_with_the_same_logits(tiny_dirs, load_model, tmp_path, arch, method):
    settings = METHODS[method]
    model, tokenizer = load_model(arch)
    family = family_for(model.config)
    parts = [add_lora(part, family, settings, seed=1) for part in split_model(model, 2, 2)]
    for part in parts:
        perturb_adapter(part)
        part.eval()
    out = export_parts_adapter(parts, tmp_path / "adapter", family, settings, str(tiny_dirs[arch]))

    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == PEFT_TYPES[settings.method] and config["task_type"] == "CAUSAL_LM"
    assert config.get("use_dora", False) is settings.use_dora and config.get("use_rslora", False) is settings.use_rslora
    weights = load_file(str(out / ADAPTER_WEIGHTS))
    layers = {int(key.split(f".{family.layers_attr}.")[1].split(".")[0]) for key in weights}
    assert layers == set(range(6)), "every part's blocks are in the one adapter"

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dirs[arch]), out).eval()
    assert loaded.peft_config["default"].peft_type.value == PEFT_TYPES[settings.method]
    input_ids, attention_mask, _ = tokenize(tokenizer, "left")
    full = dict(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=positions_from_mask(attention_mask, input_ids.shape[1]))
    with torch.no_grad():
        expected = run_split(parts, input_ids, attention_mask).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_dirs[arch])(**full).logits
        got = loaded(**full).logits
    mask = attention_mask.bool()
    assert (expected[mask] - base[mask]).abs().max() > 1e-3, "the adapter changes the output"
    assert torch.allclose(got[mask], expected[mask], atol=1e-5)


def test_methods_that_cannot_be_split_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="cannot be split: AdaLoRA shares one rank budget across all layers"):
        LoraSettings(method="adalora")
    with pytest.raises(ValueError, match="cannot be split: VeRA shares one pair of random projection"):
        check_method("VeRA")
    with pytest.raises(ValueError, match="unknown adapter method 'bitfit'; choose one of lora, loha, lokr, ia3"):
        LoraSettings(method="bitfit")
    assert set(UNSPLITTABLE_METHODS).isdisjoint(ADAPTER_METHODS)
    with pytest.raises(ValueError, match="DoRA is a LoRA option; the LoHa method has no such flag"):
        LoraSettings(method="loha", use_dora=True)
    with pytest.raises(ValueError, match="the gpt2 family's projections are transposed Conv1D layers"):
        LoraSettings(method="lokr").peft_config(family_for(GPT2Config()))
    with pytest.raises(ValueError, match="a private Bottom .* needs the LoRA method, not IA3"):
        TrainConfig(lora=LoraSettings(method="ia3"), max_steps=1, privacy=PrivacySettings(private_bottom=0.1))


# ---------------------------------------------------------------- over a real trunk server


def trainer(tiny_dirs, dataset, settings, client=None):
    """A short run with ``settings``; its events go to ``.events``."""
    config = TrainConfig(lora=settings, max_steps=STEPS // 2, batch_size=3, seq_len=32, learning_rate=2e-2,
                         max_grad_norm=0.5, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    data = prepare_training_data(tokenizer, load_dataset_file(dataset).examples, config)
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    engine = (SplitEngine(model, config, client, secret=SECRET) if client
              else LocalEngine(model, config, SplitSpec(6, 2, 2), secret=SECRET))
    events = []
    run = SplitTrainer(engine, config, data, tokenizer.pad_token_id, callbacks=[events.append])
    run.events = events
    return run


def moved(key: str, value: torch.Tensor) -> bool:
    """Whether a weight peft starts at zero (LoRA B, LoHa w2_b, LoKr w1) or one (IA3) has left its start."""
    if key.endswith(("lora_B.weight", "hada_w2_b", "lokr_w1")):
        return bool(value.abs().max() > 0)
    return key.endswith("ia3_l") and bool((value - 1).abs().max() > 0)


def run(tiny_dirs, dataset, settings, client=None):
    """Losses and adapter states of a short run with ``settings``."""
    this = trainer(tiny_dirs, dataset, settings, client)
    this.run()
    states = {}
    for state in this.engine.adapter_states():
        states.update(state)
    return losses_of(this.events), states


TRUNK_METHODS = ["loha", "lokr", "ia3", "lora-dora"]


@pytest.mark.parametrize("method", TRUNK_METHODS)
def test_split_run_over_a_trunk_equals_the_local_run_for_each_method(tiny_dirs, dataset, trunk, method):
    settings = METHODS[method]
    local_losses, local_states = run(tiny_dirs, dataset, settings)
    with TrunkClient(trunk.address, trunk.token) as client:
        assert settings.method in client.info().adapter_methods
        split_losses, split_states = run(tiny_dirs, dataset, settings, client)

    assert list(split_losses) == list(range(1, STEPS // 2 + 1))
    assert list(split_losses.values()) == pytest.approx(list(local_losses.values()), rel=1e-5)
    assert split_states.keys() == local_states.keys()
    trunk_keys = [k for k in split_states if any(f".layers.{i}." in k for i in (2, 3))]
    assert any(moved(k, split_states[k]) for k in trunk_keys), "the trunk's blocks carry a trained adapter too"
    for key in split_states:
        assert torch.allclose(split_states[key], local_states[key], atol=1e-5), key


def test_sessions_of_different_methods_train_side_by_side_on_one_trunk(tiny_dirs, dataset, trunk):
    """A LoHa run and an IA3 run at once on one trunk (one set of weights): each equals its local run."""
    methods = ("loha", "ia3")
    local = {m: run(tiny_dirs, dataset, METHODS[m])[0] for m in methods}
    clients = {m: TrunkClient(trunk.address, trunk.token) for m in methods}
    # Models load one after the other: transformers' from_pretrained is not thread-safe.
    trainers = {m: trainer(tiny_dirs, dataset, METHODS[m], clients[m]) for m in methods}
    assert clients["loha"].info().active_sessions >= 2

    def work(method):
        with clients[method]:
            trainers[method].run()

    errors = run_concurrently({m: (lambda m=m: work(m)) for m in methods})
    assert not errors, errors
    for method in methods:
        split = losses_of(trainers[method].events)
        assert list(split) == list(range(1, STEPS // 2 + 1))
        assert list(split.values()) == pytest.approx(list(local[method].values()), rel=1e-5), method
    assert local["loha"] != local["ia3"]


def test_train_cli_takes_the_method_and_refuses_one_that_cannot_be_split(tiny_dirs, dataset, trunk, tmp_path):
    common = ("train", "--model", str(tiny_dirs["llama"]), "--data", str(dataset), "--steps", "2",
              "--batch-size", "2", "--seq-len", "32")
    result = splitcore_cli(*common, "--out", str(tmp_path / "lokr"), "--trunk", trunk.address, "--token",
                           trunk.token, "--adapter-method", "lokr", "--lora-r", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((tmp_path / "lokr" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LOKR" and config["r"] == 2
    assert json.loads((tmp_path / "lokr" / "training_args.json").read_text())["lora"]["method"] == "lokr"

    for extra, message in ((("--adapter-method", "adalora"), "cannot be split: AdaLoRA shares one rank budget"),
                           (("--adapter-method", "ia3", "--use-rslora"), "rsLoRA is a LoRA option")):
        refused = splitcore_cli(*common, "--out", str(tmp_path / "refused"), "--local", *extra)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr[-2000:]
        assert "Traceback" not in refused.stderr
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())


@pytest.mark.parametrize("method", ["loha", "lokr", "ia3", "lora-dora"])
def test_split_generation_with_an_adapter_of_each_method_gives_the_local_greedy_tokens(tiny_dirs, trunk, tmp_path,
                                                                                       method):
    """The trunk's share of the adapter (its blocks' weights) runs in an inference session of that method."""
    settings = METHODS[method]
    model_dir = tiny_dirs["llama"]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    family = family_for(model.config)
    parts = [add_lora(part, family, settings, seed=2) for part in split_model(model, 2, 2)]
    for part in parts:
        perturb_adapter(part, seed=11, scale=1.0)  # enough to change the tiny model's greedy tokens
    adapter = export_parts_adapter(parts, tmp_path / "adapter", family, settings, str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    input_ids = encode_prompt(tokenizer, "Q: what is 4 plus 4?\nA:", chat=False)

    def local_tokens(with_adapter):
        return local_greedy_tokens(model_dir, input_ids, tokenizer.pad_token_id, 10,
                                   adapter if with_adapter else None)

    with TrunkClient(trunk.address, trunk.token) as client:
        generator = SplitGenerator.from_directory(model_dir, client, adapter)
        assert generator.trunk_lora is not None and generator.trunk_lora.method == settings.method
        split = list(generator.generate(input_ids, tokenizer, GenerationSettings(max_new_tokens=10)))
    assert split == local_tokens(True)
    assert split != local_tokens(False), "the adapter must change the answer for the comparison to mean something"
