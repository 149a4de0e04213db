"""`python -m splitcore make-tiny` and `generate`, run as a user runs them."""

from __future__ import annotations

import pytest
import torch
from cli_helpers import splitcore_cli
from lora_helpers import trained_parts
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from splitcore import LoraSettings, export_parts_adapter
from splitcore.generation.local import GenerationSettings, generate_text


@pytest.mark.parametrize("arch,model_class", [("gpt2", "GPT2LMHeadModel"), ("llama", "LlamaForCausalLM")])
def test_make_tiny_writes_a_loadable_model_with_a_working_tokenizer(tmp_path, arch, model_class):
    result = splitcore_cli("make-tiny", "--arch", arch, "--out", str(tmp_path / arch))
    assert result.returncode == 0, result.stderr
    out = tmp_path / arch
    assert result.stdout.strip() == str(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == model_class
    assert model.config.num_hidden_layers == 6
    text = "Any text, even ünïcödé and emoji 🙂, survives the round trip."
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    assert max(ids) < model.config.vocab_size
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_make_tiny_is_reproducible(tmp_path):
    for name in ("a", "b"):
        assert splitcore_cli("make-tiny", "--arch", "llama", "--out", str(tmp_path / name)).returncode == 0
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_make_tiny_rejects_an_unknown_arch(tmp_path):
    result = splitcore_cli("make-tiny", "--arch", "bert", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "invalid choice: 'bert'" in result.stderr


@pytest.mark.parametrize("chat", [False, True])
def test_generate_with_an_adapter_matches_peft_in_process(tiny_dirs, tmp_path, chat):
    model_dir = tiny_dirs["llama"]
    settings = LoraSettings(r=4, alpha=8)
    family, parts = trained_parts(model_dir, settings)
    adapter = export_parts_adapter(parts, tmp_path / "adapter", family, settings, str(model_dir))
    prompt = "The quick brown fox"
    args = ["generate", "--model", str(model_dir), "--adapter", str(adapter), "--prompt", prompt,
            "--max-new-tokens", "12"] + (["--chat"] if chat else [])
    result = splitcore_cli(*args)
    assert result.returncode == 0, result.stderr

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with_adapter = PeftModel.from_pretrained(base, adapter).eval()
    expected = generate_text(with_adapter, tokenizer, prompt, GenerationSettings(max_new_tokens=12), chat=chat)
    assert result.stdout == expected + "\n"
    without = generate_text(AutoModelForCausalLM.from_pretrained(model_dir).eval(), tokenizer, prompt,
                            GenerationSettings(max_new_tokens=12), chat=chat)
    assert expected != without, "the adapter must change what the model generates"


def test_generate_reports_a_missing_model_directory(tmp_path):
    result = splitcore_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert result.returncode == 2
    assert f"error: model directory {tmp_path / 'nope'} has no config.json" in result.stderr


def test_generate_reports_a_missing_adapter(tiny_dirs, tmp_path):
    result = splitcore_cli("generate", "--model", str(tiny_dirs["gpt2"]), "--adapter", str(tmp_path), "--prompt", "hi")
    assert result.returncode == 2
    assert f"error: adapter directory {tmp_path} has no adapter_config.json" in result.stderr


def test_generate_rejects_bad_settings(tiny_dirs):
    result = splitcore_cli("generate", "--model", str(tiny_dirs["gpt2"]), "--prompt", "hi", "--max-new-tokens", "0")
    assert result.returncode == 2
    assert "max_new_tokens must be an integer from 1 to 4096, got 0" in result.stderr
