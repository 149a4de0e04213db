"""The playground end to end: a real Redis, a real Celery worker process, a real trunk server.

A trained job and the bare base model answer the same prompt side by side, each exactly as
the unsplit model (with and without the adapter) answers it here; the tokens stream over the
WebSocket; failures say what went wrong; only the owner sees a generation.
"""

from __future__ import annotations

import io
import json
import time

import pytest
import torch
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.utils.html import escape
from peft import PeftModel
from rest_framework.test import APIClient
from transformers import AutoModelForCausalLM, AutoTokenizer
from web_fixtures import TINY_MODEL_ID, wait_for_job

from splitcore.generation.local import encode_prompt
from webapp.asgi import application
from webapp.playground import services
from webapp.playground.decoding import IncrementalDecoder
from webapp.playground.models import Generation
from webapp.playground.tasks import generate
from webapp.training.models import Job
from webapp.trunks.models import TrunkServer

pytestmark = pytest.mark.django_db(transaction=True)

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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        generations = [Generation.objects.get(pk=pk) for pk in ids]
        if all(generation.is_finished for generation in generations):
            return generations
        time.sleep(0.2)
    log = worker.log()[-4000:] if worker else ""
    raise AssertionError(f"generations {ids} are still {[g.status for g in generations]} after {timeout} s\n{log}")


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


def socket_headers(client=None) -> list[tuple[bytes, bytes]]:
    """An allowed Origin, and the session cookie of a logged-in test client."""
    headers = [(b"origin", b"http://localhost")]
    if client is not None:
        name = django_settings.SESSION_COOKIE_NAME
        headers.append((b"cookie", f"{name}={client.cookies[name].value}".encode()))
    return headers


def connect_once(path: str, headers) -> tuple[bool, int | None, dict | None]:
    """(accepted, close code when refused, the first message when accepted)."""

    async def run():
        communicator = WebsocketCommunicator(application, path, headers=headers)
        accepted, detail = await communicator.connect(timeout=10)
        first = await communicator.receive_json_from(timeout=10) if accepted else None
        await communicator.disconnect()
        return accepted, None if accepted else detail, first

    return async_to_sync(run)()


def apply_token(text: str, event: dict) -> str:
    """What the page does with a token event."""
    return text[:event["offset"]] + event["text"]


def test_compare_base_and_adapter_side_by_side(client, owner, registered_trunk, celery_worker):
    job = train_job(owner, celery_worker)
    client.force_login(owner)
    page = client.get("/playground/").content.decode()
    assert "Base model only" in page and f"Job {job.pk}: sums on {TINY_MODEL_ID}" in page

    response = client.post("/playground/", {"job": job.pk, "base_model": TINY_MODEL_ID,
                                            "prompt": PROMPT.replace("\n", "\r\n"), "max_new_tokens": 12,
                                            "temperature": 0, "seed": 0})
    assert response.status_code == 302, response.content.decode()[-3000:]
    base, adapted = Generation.objects.order_by("id")
    assert response["Location"] == f"/playground/?ids={base.pk},{adapted.pk}"
    assert (base.job, adapted.job) == (None, job)
    assert base.prompt == adapted.prompt == PROMPT, "line breaks as typed, not as the browser sent them"
    assert base.chat is adapted.chat is False

    base, adapted = wait_for_generations([base.pk, adapted.pk], celery_worker)
    assert base.status == adapted.status == "succeeded", (base.error_message, adapted.error_message)
    assert (base.output, base.token_count) == local_answer(PROMPT, False, 12)
    assert (adapted.output, adapted.token_count) == local_answer(PROMPT, False, 12, job.adapter_dir)
    assert adapted.output != base.output, "the adapter must change the answer for the comparison to mean something"
    assert base.started_at and base.finished_at and not base.error_message

    page = client.get(response["Location"]).content.decode()
    assert "Base model" in page and f"With adapter (job {job.pk})" in page
    assert escape(base.output) in page and escape(adapted.output) in page
    assert page.count('data-status="succeeded"') == 2
    assert f'data-socket-path="/ws/generations/{adapted.pk}/"' in page
    assert "js/playground.js" in page


def test_tokens_stream_over_the_websocket(client, owner, registered_trunk, celery_worker, redis_server, settings):
    from webapp.settings import channel_layer_host

    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer",
                                           "CONFIG": {"hosts": [channel_layer_host(redis_server.url)]}}}
    # Created without its task, so that the page is connected before the worker starts.
    generation = Generation.objects.create(owner=owner, base_model=TINY_MODEL_ID, prompt="hello, how are you?",
                                           chat=True, max_new_tokens=24)
    client.force_login(owner)
    path = f"/ws/generations/{generation.pk}/"

    async def watch():
        communicator = WebsocketCommunicator(application, path, headers=socket_headers(client))
        accepted, _ = await communicator.connect(timeout=10)
        assert accepted
        snapshot = await communicator.receive_json_from(timeout=10)
        generate.delay(generation.pk)
        received = []
        while not received or received[-1]["type"] != "done":
            received.append(await communicator.receive_json_from(timeout=60))
        await communicator.disconnect()
        return snapshot, received

    snapshot, received = async_to_sync(watch)()
    generation.refresh_from_db()
    assert generation.status == "succeeded", generation.error_message
    assert snapshot == {"type": "snapshot", "generation": generation.pk, "status": "queued", "text": "",
                        "error_message": "", "token_count": 0}
    assert received[0] == {"type": "status", "generation": generation.pk, "status": "running"}
    tokens = [event for event in received if event["type"] == "token"]
    assert len(tokens) >= 2 and len(received) == len(tokens) + 2
    text = ""
    for event in tokens:
        text = apply_token(text, event)
    assert received[-1] == {"type": "done", "generation": generation.pk, "status": "succeeded",
                            "text": generation.output, "error_message": "", "token_count": generation.token_count}
    assert text == generation.output
    assert (generation.output, generation.token_count) == local_answer("hello, how are you?", True, 24)

    accepted, _, late = connect_once(path, socket_headers(client))
    assert accepted and late["status"] == "succeeded" and late["text"] == generation.output


def test_only_the_owner_sees_a_generation(client, owner, other, redis_server):
    mine = Generation.objects.create(owner=owner, base_model=TINY_MODEL_ID, prompt="<script>alert(1)</script>",
                                     status="succeeded", output="<b>bold</b> & more", token_count=7)
    theirs = Generation.objects.create(owner=other, base_model=TINY_MODEL_ID, prompt="theirs", status="queued")

    client.force_login(owner)
    page = client.get(f"/playground/?ids={mine.pk}").content.decode()
    assert escape("<b>bold</b> & more") in page and "<b>bold</b>" not in page
    assert escape("<script>alert(1)</script>") in page and "<script>alert(1)" not in page
    for ids in (theirs.pk, f"{mine.pk},{theirs.pk}", "x", f"{mine.pk},999999"):
        assert client.get(f"/playground/?ids={ids}").status_code == 404, ids
    assert connect_once(f"/ws/generations/{theirs.pk}/", socket_headers(client))[:2] == (False, 4404)
    assert connect_once("/ws/generations/999999/", socket_headers(client))[:2] == (False, 4404)
    accepted, _, snapshot = connect_once(f"/ws/generations/{mine.pk}/", socket_headers(client))
    assert accepted and snapshot["text"] == "<b>bold</b> & more" and snapshot["status"] == "succeeded"

    client.force_login(other)
    assert client.get(f"/playground/?ids={mine.pk}").status_code == 404
    assert connect_once(f"/ws/generations/{mine.pk}/", socket_headers(client))[:2] == (False, 4404)

    client.logout()
    for url in ("/playground/", f"/playground/?ids={mine.pk}"):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/accounts/login/"), url
    assert client.post("/playground/", {"prompt": "hi"}).status_code == 302
    assert connect_once(f"/ws/generations/{mine.pk}/", socket_headers())[:2] == (False, 4401)
    assert Generation.objects.count() == 2, "nothing was created"


def test_the_form_reports_errors_per_field(client, owner, other, registered_trunk):
    theirs = Job.objects.create(owner=other, dataset_name="theirs", base_model=TINY_MODEL_ID, status="succeeded")
    no_adapter = Job.objects.create(owner=owner, dataset_name="mine", base_model=TINY_MODEL_ID, status="succeeded")
    client.force_login(owner)
    valid = {"base_model": TINY_MODEL_ID, "prompt": "hello", "max_new_tokens": 8, "temperature": 0, "seed": 0}

    response = client.post("/playground/", {**valid, "prompt": "   ", "max_new_tokens": 0, "temperature": 3,
                                            "seed": -1})
    assert response.status_code == 200
    errors = response.context["form"].errors
    assert set(errors) == {"prompt", "max_new_tokens", "temperature", "seed"}
    page = response.content.decode()
    assert "Type a prompt." in page and "Ensure this value is less than or equal to 2.0." in page
    assert "Ensure this value is greater than or equal to 1." in page

    cases = [
        ({"prompt": "x" * 4001}, "prompt", "The prompt has 4001 characters; at most 4000 are allowed."),
        ({"max_new_tokens": 513}, "max_new_tokens", "Ensure this value is less than or equal to 512."),
        ({"job": theirs.pk}, "job", "Select a valid choice."),
        ({"base_model": "not-a-model"}, "base_model", "Select a valid choice."),
        ({"job": no_adapter.pk}, "job", f"Job {no_adapter.pk} has no adapter"),
    ]
    for change, field, message in cases:
        response = client.post("/playground/", {**valid, **change})
        assert response.status_code == 200, change
        assert list(response.context["form"].errors) == [field], (change, response.context["form"].errors)
        assert message in response.context["form"].errors[field][0], change
        assert escape(message) in response.content.decode(), change
    assert not Generation.objects.exists(), "nothing is stored for a rejected request"

    registered_trunk.delete()
    response = client.post("/playground/", valid)
    assert "No trunk server is up" in response.content.decode()
    assert not Generation.objects.exists()


def test_a_generation_without_a_reachable_trunk_fails_with_a_clear_message(owner, web_dirs, web_trunk,
                                                                           celery_worker):
    (nothing,) = services.start_comparison(owner, "hello", base_model=TINY_MODEL_ID, max_new_tokens=4)
    assert nothing.chat is True, "chat defaults to on when the tokenizer has a chat template"
    (nothing,) = wait_for_generations([nothing.pk], celery_worker)
    assert nothing.status == "failed"
    assert "no trunk server is registered" in nothing.error_message

    TrunkServer.objects.create(name="dead", address="127.0.0.1:9", token=web_trunk.token, model_id=TINY_MODEL_ID,
                               status=TrunkServer.Status.UP, max_sessions=4, active_sessions=0)
    (dead,) = services.start_comparison(owner, "hello", base_model=TINY_MODEL_ID, max_new_tokens=4)
    (dead,) = wait_for_generations([dead.pk], celery_worker)
    assert dead.status == "failed" and dead.output == ""
    assert "the trunk server dead at 127.0.0.1:9 could not be reached" in dead.error_message
    assert "check that it is running" in dead.error_message


def test_the_decoder_streams_whole_characters(tiny_dirs):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    text = "héllo wörld, 2 + 2 = 4 🙂 done"
    ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    decoder = IncrementalDecoder(tokenizer)
    shown = ""
    for token_id in ids:
        change = decoder.push(token_id)
        if change is not None:
            offset, delta = change
            assert "\ufffd" not in delta
            shown = shown[:offset] + delta
    assert shown == decoder.final_text() == text
