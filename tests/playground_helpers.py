"""The playground's tests' shared steps: a job trained by the real worker, generations awaited, the answer
of the unsplit model here, and the text a page assembles from a socket's events."""

from __future__ import annotations

import io
import json

import torch
from django.conf import settings as django_settings
from peft import PeftModel
from polling import wait_until
from rest_framework.test import APIClient
from transformers import AutoModelForCausalLM, AutoTokenizer
from web_fixtures import TINY_MODEL_ID, wait_for_job

from splitcore.generation.local import encode_prompt
from webapp.playground.models import Generation
from webapp.training.models import Job

ROWS = [{"prompt": f"Q: what is {i} plus {i}?\nA:", "completion": f" {2 * i}"} for i in range(24)]
JOB = {"base_model": TINY_MODEL_ID, "max_steps": 4, "batch_size": 2, "grad_accum_steps": 1, "max_seq_length": 32,
       "learning_rate": 0.05, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "val_fraction": 0.0}
PROMPT = "Q: what is 3 plus 3?\nA:"


def train_job(owner, worker) -> Job:
    api = APIClient()
    api.force_authenticate(owner)
    content = io.BytesIO(("\n".join(json.dumps(row) for row in ROWS) + "\n").encode())
    content.name = "sums.jsonl"
    dataset = api.post("/api/datasets/", {"file": content, "name": "sums"}, format="multipart")
    assert dataset.status_code == 201, dataset.content
    created = api.post("/api/jobs/", {**JOB, "dataset": dataset.json()["id"]}, format="json")
    assert created.status_code == 201, created.content
    job = wait_for_job(created.json()["id"], worker=worker)
    assert job.status == "succeeded" and job.has_adapter, job.error_message
    return job


def wait_for_generations(ids, worker=None, timeout: float = 120) -> list[Generation]:
    generations = []

    def finished() -> bool:
        nonlocal generations
        generations = [Generation.objects.get(pk=pk) for pk in ids]
        return all(generation.is_finished for generation in generations)

    def seen() -> str:
        log = worker.log()[-4000:] if worker else ""
        return f"{[generation.status for generation in generations]}\n{log}"

    wait_until(finished, f"generations {ids} are finished", timeout=timeout, observed=seen, interval=0.2)
    return generations


def local_answer(prompt: str, chat: bool, max_new_tokens: int, adapter_dir=None) -> tuple[str, int]:
    """Greedy decoding with the unsplit model in this process: (text, number of new tokens)."""
    model_dir = django_settings.MODELS_DIR / TINY_MODEL_ID
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    input_ids = encode_prompt(tokenizer, prompt, chat)
    with torch.no_grad():
        output = model.eval().generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                       max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)
    new_tokens = output[0, input_ids.shape[1]:].tolist()
    return tokenizer.decode(new_tokens, skip_special_tokens=True), len(new_tokens)


def apply_token(text: str, event: dict) -> str:
    """What the page does with a token event."""
    return text[:event["offset"]] + event["text"]


def assemble(events: list[dict]) -> tuple[str, dict]:
    """The text a page shows from a socket's events (see webapp/playground/events.py), and the last event.

    Fails on what would leave a hole: a token event before the snapshot, or one that does not follow
    the text so far (a lost event).
    """
    text = count = None
    for event in events:
        if event["type"] == "snapshot":
            text, count = event["text"], event["token_count"]
        elif event["type"] == "token":
            assert text is not None, f"a token event before the snapshot: {events}"
            if event["token_count"] <= count:
                continue  # already in the snapshot
            assert event["previous_count"] == count and event["offset"] <= len(text), f"an event is missing: {events}"
            text, count = apply_token(text, event), event["token_count"]
    return text, events[-1]
