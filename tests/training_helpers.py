"""The tiny Llama's arithmetic training run, as the split-training tests and their neighbours run it."""

from __future__ import annotations

import json

from cli_helpers import splitcore_cli

from splitcore.privacy import ClientSecret
from splitcore.training import StepMetrics

STEPS = 10
# The data owner's key: the same in every run of a test, so split and local runs start alike and resume.
SECRET = ClientSecret(bytes(range(32)))
# Runs compared with each other mix the same nonce into the key file's key (each run draws a fresh one otherwise).
KEY_NONCE = "5eed" * 8


def train_cli(tiny_dirs, dataset, out, *where, extra=()):
    metrics = out / "metrics.jsonl"
    result = splitcore_cli(
        "train", "--model", str(tiny_dirs["llama"]), "--data", str(dataset), "--out", str(out), *where,
        "--steps", str(STEPS), "--batch-size", "3", "--grad-accum", "2", "--seq-len", "32", "--lr", "2e-2",
        "--warmup", "2", "--schedule", "cosine", "--max-grad-norm", "0.5", "--lora-r", "4", "--lora-alpha", "8",
        "--lora-dropout", "0", "--val-fraction", "0.2", "--eval-every", "5", "--metrics-jsonl", str(metrics),
        "--key-nonce", KEY_NONCE, *extra,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def trunk_args(trunk):
    return ("--trunk", trunk.address, "--token", trunk.token)


def losses_of(events):
    return {e.step: e.loss for e in events if isinstance(e, StepMetrics)}
