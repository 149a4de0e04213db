"""How far each wire encoding drifts from fp32: the same 20-step split run against a real trunk process.

Every run starts from the same weights, key, seed and data; only the encoding of the tensors that
cross the wire (hidden states one way, their gradients the other, both directions) differs.
Bounds are about ten times what was measured on 2 CPU cores (fp16 ~8e-7, bf16 ~9e-5, int8 ~6e-5
largest relative per-step loss difference); `benchmarks/split_overhead.py --drift-only` prints the table.
"""

from __future__ import annotations

import json
import random

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer
from trunk_process import start_trunk

from splitcore import LoraSettings
from splitcore.data.formats import load_dataset_file
from splitcore.privacy import ClientSecret
from splitcore.remote.client import TrunkClient
from splitcore.remote.wire import FLOAT_ENCODINGS
from splitcore.training import SplitEngine, SplitTrainer, StepMetrics, TrainConfig
from splitcore.training.batches import prepare_training_data

STEPS = 20
SECRET = ClientSecret(bytes(range(32)))
# Largest relative loss difference from the fp32 run, at any step and at the last one.
MAX_DRIFT = {"bf16": 1e-3, "fp16": 1e-5, "int8": 1e-3}
WORDS = ("split learning keeps every token of the data with its owner while a remote trunk computes "
         "the middle layers").split()


@pytest.fixture(scope="module")
def runs(tiny_dirs, tmp_path_factory) -> dict[str, list[StepMetrics]]:
    """Encoding -> the steps of one run; all four runs on one trunk process."""
    root = tmp_path_factory.mktemp("drift")
    rng = random.Random(0)
    dataset = root / "text.jsonl"
    dataset.write_text("".join(json.dumps({"text": " ".join(rng.choices(WORDS, k=40))}) + "\n" for _ in range(40)))
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    trunk = start_trunk(tiny_dirs["llama"], root)
    results = {}
    try:
        for encoding in FLOAT_ENCODINGS:
            config = TrainConfig(lora=LoraSettings(r=4, alpha=8, dropout=0.0), max_steps=STEPS, batch_size=4,
                                 seq_len=32, learning_rate=5e-3, max_grad_norm=1.0, seed=0, wire_encoding=encoding)
            data = prepare_training_data(tokenizer, load_dataset_file(dataset).examples, config)
            steps: list[StepMetrics] = []
            with TrunkClient(trunk.address, trunk.token, wire_encoding=encoding) as client:
                engine = SplitEngine(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]), config, client,
                                     secret=SECRET)
                SplitTrainer(engine, config, data, tokenizer.pad_token_id, callbacks=[
                    lambda event: steps.append(event) if isinstance(event, StepMetrics) else None]).run()
                engine.close()
            results[encoding] = steps
    finally:
        trunk.stop()
    return results


def drifts(steps: list[StepMetrics], reference: list[StepMetrics]) -> list[float]:
    return [abs(ours.loss - theirs.loss) / theirs.loss for ours, theirs in zip(steps, reference, strict=True)]


def test_every_encoding_trains_all_steps_and_fp32_learns(runs):
    assert all([s.step for s in steps] == list(range(1, STEPS + 1)) for steps in runs.values())
    assert runs["fp32"][-1].loss < runs["fp32"][0].loss


@pytest.mark.parametrize("encoding", ["bf16", "fp16", "int8"])
def test_each_encoding_stays_within_its_drift_bound(runs, encoding):
    per_step = drifts(runs[encoding], runs["fp32"])
    table = " ".join(f"{d:.1e}" for d in per_step)
    assert max(per_step) <= MAX_DRIFT[encoding], f"{encoding} drift per step: {table}"
    assert per_step[-1] <= MAX_DRIFT[encoding]


def test_fp16_is_at_least_as_close_to_fp32_as_bf16(runs):
    fp16, bf16 = drifts(runs["fp16"], runs["fp32"]), drifts(runs["bf16"], runs["fp32"])
    assert max(fp16) <= max(bf16)
    assert sum(fp16) <= sum(bf16)


def test_narrower_encodings_send_fewer_bytes(runs):
    fp32_bytes = runs["fp32"][0].wire_bytes
    ratios = {encoding: steps[0].wire_bytes / fp32_bytes for encoding, steps in runs.items()}
    # fp16 carries one 4-byte scale per tensor besides its values; int8 one per 64 values.
    assert ratios["bf16"] == pytest.approx(0.5, abs=0.01) and ratios["fp16"] == pytest.approx(0.5, abs=0.01)
    assert ratios["int8"] == pytest.approx(0.25 + 1 / 64, abs=0.02)
