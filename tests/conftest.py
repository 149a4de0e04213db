"""Shared fixtures: tiny models on disk, a tokenised batch, the default model, real trunk servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from recording_proxy import start_proxy
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, Qwen2Config
from trunk_process import start_trunk

from splitcore.model import default_model
from splitcore.model.tiny_models import TINY_ARCHS, TinyModelSpec, build_tokenizer, write_tiny_model

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Django's key in the test process and in every web and worker process the tests start, whatever the
# environment's SECRET_KEY (`make test` draws a fresh one): fixed, so that what derives from it (signed
# sessions, the site's client secret of older jobs) is the same in every process and in every run.
TEST_SECRET_KEY = "splitlearn-tests-only-secret-key-0123456789"
# The processes the tests start inherit it. The settings themselves were read before this file (pytest-django
# sets Django up first, so the environment still needs some SECRET_KEY); pytest_configure pins them.
os.environ["SECRET_KEY"] = TEST_SECRET_KEY

pytest_plugins = ["web_fixtures"]

# Every family the registry claims; the tiny architectures also exist as tiny models on disk.
ARCHS = (*TINY_ARCHS, "mistral", "qwen2")

SENTENCES = [
    "hello there",
    "The quick brown fox jumps over the lazy dog, twice.",
    "Split learning keeps the data with its owner.",
]


def pytest_configure(config) -> None:
    from django.conf import settings

    if settings.configured:
        settings.SECRET_KEY = TEST_SECRET_KEY


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: write_tiny_model(root / arch, TinyModelSpec(arch=arch)) for arch in TINY_ARCHS}


@pytest.fixture(scope="module")
def trunk(tiny_dirs, tmp_path_factory):
    """A real trunk server process of the tiny Llama (up to 6 sessions), one per module that uses it.

    Modules that need a trunk started with other options define a ``trunk`` fixture of their own.
    """
    process = start_trunk(tiny_dirs["llama"], tmp_path_factory.mktemp("trunk-logs"), "--max-sessions", "6")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def proxied_trunk_process(tiny_dirs, tmp_path_factory):
    """A real trunk server behind a recording proxy, shared by a module's tests."""
    trunk = start_trunk(tiny_dirs["llama"], tmp_path_factory.mktemp("trunk"))
    proxy = start_proxy(trunk.address)
    yield proxy, trunk
    proxy.stop()
    trunk.stop()


@pytest.fixture
def proxied_trunk(proxied_trunk_process):
    """(the proxy, with an empty record; its address; the trunk's token)."""
    proxy, trunk = proxied_trunk_process
    proxy.proxy.clear()
    return proxy.proxy, proxy.address, trunk.token


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A JSONL file of 30 prompt/completion sums ("Q: what is 4 plus 4?" -> " 8")."""
    path = tmp_path_factory.mktemp("data") / "arithmetic.jsonl"
    rows = [{"prompt": f"Q: what is {i} plus {i}?\nA:", "completion": f" {2 * i}"} for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _in_memory_config(arch: str, tokenizer):
    common = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    if arch == "mistral":
        # A window shorter than the test sentences, so sliding-window masks really cut.
        return MistralConfig(sliding_window=4, **common)
    # Qwen2 with alternating full and sliding layers: each part must build both masks.
    return Qwen2Config(
        use_sliding_window=True, sliding_window=4, max_window_layers=6,
        layer_types=["full_attention", "sliding_attention"] * 3, **common,
    )


@pytest.fixture(scope="session")
def load_model(tiny_dirs):
    """load_model(arch, attn=None) -> a fresh (model, tokenizer), identical weights each call.

    ``attn`` None: the model's default attention (SDPA, or eager where SDPA is unsupported: Gemma 2).
    """

    def load(arch: str, attn: str | None = None):
        if arch in tiny_dirs:
            model = AutoModelForCausalLM.from_pretrained(tiny_dirs[arch], attn_implementation=attn)
            tokenizer = AutoTokenizer.from_pretrained(tiny_dirs[arch])
        else:
            tokenizer = build_tokenizer()
            attn = attn or "sdpa"
            config = _in_memory_config(arch, tokenizer)
            config._attn_implementation = attn
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
        return model, tokenizer

    return load


def local_greedy_tokens(model_dir, input_ids: torch.Tensor, pad_token_id: int, max_new_tokens: int,
                        adapter=None) -> list[int]:
    """The new tokens the unsplit model (with ``adapter``: through peft) generates greedily for a (1, seq) prompt."""
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    output = model.eval().generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                   max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id)
    return output[0, input_ids.shape[1]:].tolist()


def tokenize(tokenizer, padding_side: str = "right", sentences=SENTENCES):
    tokenizer.padding_side = padding_side
    batch = tokenizer(list(sentences), return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    return batch.input_ids, batch.attention_mask, labels


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory) -> Path:
    """The real default model, prepared once through the CLI (cached in $SPLITLEARN_DATA_DIR)."""
    env = dict(os.environ)
    if not env.get(default_model.DATA_DIR_ENV):
        env[default_model.DATA_DIR_ENV] = str(tmp_path_factory.mktemp("data"))
    result = subprocess.run(
        [sys.executable, "-m", "splitcore", "prepare-model"],
        capture_output=True, text=True, env=env, cwd=PROJECT_ROOT, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    directory = Path(result.stdout.strip().splitlines()[-1])
    assert directory == default_model.default_model_dir(env[default_model.DATA_DIR_ENV])
    return directory


def run_concurrently(work: dict) -> list[BaseException]:
    """Run each callable of ``work`` in its own thread; returns the exceptions they raised."""
    import threading

    errors: list[BaseException] = []

    def guarded(function):
        try:
            function()
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(function,)) for function in work.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    return errors
