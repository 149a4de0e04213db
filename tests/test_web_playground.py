"""The playground end to end: a real Redis, a real Celery worker process, a real trunk server.

A trained job and the bare base model answer the same prompt side by side, each exactly as
the unsplit model (with and without the adapter) answers it here; the tokens stream over the
WebSocket; failures say what went wrong; only the owner sees a generation.
"""

from __future__ import annotations

import os
import re
import signal
from html.parser import HTMLParser

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.template.defaultfilters import date as date_filter
from django.test import Client as django_client
from django.utils.html import escape
from playground_helpers import PROMPT, apply_token, assemble, local_answer, train_job, wait_for_generations
from polling import wait_until
from transformers import AutoTokenizer
from web_fixtures import TINY_MODEL_ID

from webapp.asgi import application
from webapp.playground import runner, services
from webapp.playground.decoding import IncrementalDecoder
from webapp.playground.history import HISTORY_SIZE
from webapp.playground.models import Generation
from webapp.playground.tasks import generate
from webapp.training.models import Job
from webapp.trunks.models import TrunkServer

pytestmark = pytest.mark.django_db(transaction=True)


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


def test_compare_base_and_adapter_side_by_side(client, owner, registered_trunk, celery_worker):
    job = train_job(owner, celery_worker)
    client.force_login(owner)
    page = client.get("/playground/").content.decode()
    assert "Base model only" in page and f'<option value="{job.pk}"' in page and escape(job.display_name) in page
    assert f"Job {job.pk}:" not in page, "jobs are picked by name"

    response = client.post("/playground/", {"job": job.pk, "base_model": TINY_MODEL_ID,
                                            "prompt": PROMPT.replace("\n", "\r\n"), "max_new_tokens": 12,
                                            "temperature": 0, "seed": 0})
    assert response.status_code == 302, response.content.decode()[-3000:]
    base, adapted = Generation.objects.order_by("id")
    assert response["Location"] == f"/playground/?ids={base.pk},{adapted.pk}"
    assert (base.job, adapted.job) == (None, job)
    assert (base.paired_with, adapted.paired_with) == (None, base), "one comparison"
    assert base.prompt == adapted.prompt == PROMPT, "line breaks as typed, not as the browser sent them"
    assert base.chat is adapted.chat is False

    base, adapted = wait_for_generations([base.pk, adapted.pk], celery_worker)
    assert base.status == adapted.status == "succeeded", (base.error_message, adapted.error_message)
    assert (base.output, base.token_count) == local_answer(PROMPT, False, 12)
    assert (adapted.output, adapted.token_count) == local_answer(PROMPT, False, 12, job.adapter_dir)
    assert adapted.output != base.output, "the adapter must change the answer for the comparison to mean something"
    assert base.started_at and base.finished_at and not base.error_message

    page = client.get(response["Location"]).content.decode()
    assert "Base model" in page and escape(f"With adapter: {job.display_name}") in page
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
                        "error_message": "", "token_count": 0, "stop_requested": False}
    assert received[0] == {"type": "status", "generation": generation.pk, "status": "running",
                           "stop_requested": False}
    tokens = [event for event in received if event["type"] == "token"]
    assert len(tokens) >= 2 and len(received) == len(tokens) + 2
    counts = [0] + [event["token_count"] for event in tokens]
    assert [event["previous_count"] for event in tokens] == counts[:-1], "each event follows the one before"
    assert counts == sorted(set(counts)) and counts[-1] <= generation.token_count
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


def add_adapter_files(job: Job) -> None:
    """What a succeeded job leaves in its directory (the page only checks that the adapter is there)."""
    job.adapter_dir.mkdir(parents=True, exist_ok=True)
    (job.adapter_dir / "adapter_config.json").write_text("{}")
    (job.adapter_dir / "adapter_model.safetensors").write_bytes(b"\0" * 16)


def up_trunk() -> TrunkServer:
    """A trunk row that looks healthy, so that the form offers the tiny model (nothing is generated)."""
    return TrunkServer.objects.create(name="listed", address="127.0.0.1:9", token="t" * 24, model_id=TINY_MODEL_ID,
                                      status=TrunkServer.Status.UP, max_sessions=4, active_sessions=0)


def select_options(page: str, name: str) -> list[dict[str, str]]:
    """The options of the page's ``<select name=...>``: their attributes (valueless ones map to their
    name), and ``label``: their text."""

    class Options(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.inside, self.found = False, []

        def handle_starttag(self, tag, attrs):
            if tag == "select":
                self.inside = dict(attrs).get("name") == name
            elif tag == "option" and self.inside:
                self.found.append({key: key if value is None else value for key, value in attrs} | {"label": ""})

        def handle_endtag(self, tag):
            if tag == "select":
                self.inside = False

        def handle_data(self, data):
            if self.inside and self.found:
                self.found[-1]["label"] += data.strip()

    parser = Options()
    parser.feed(page)
    return parser.found


def stop_url(generation: Generation) -> str:
    return f"/playground/generations/{generation.pk}/stop/"


def stop_button_hidden(page: str, generation: Generation) -> bool:
    form = re.search(rf'<form method="post" data-role="stop" action="{stop_url(generation)}"\s*(hidden)?>', page)
    assert form is not None, "every panel has a Stop button (hidden once it has ended)"
    return form.group(1) is not None


def test_a_queued_generation_stops_at_once_for_its_owner_only(client, owner, other, redis_server, web_dirs):
    # Created without its task: it stays queued until the test runs it.
    generation = Generation.objects.create(owner=owner, base_model=TINY_MODEL_ID, prompt="hello", max_new_tokens=4)

    client.force_login(owner)
    page = client.get(f"/playground/?ids={generation.pk}").content.decode()
    assert not stop_button_hidden(page, generation), "a queued panel shows its Stop button"

    client.force_login(other)
    assert client.post(stop_url(generation)).status_code == 404
    assert client.get(stop_url(generation)).status_code == 405
    strict = django_client(enforce_csrf_checks=True)
    strict.force_login(owner)
    refused = strict.post(stop_url(generation), HTTP_ACCEPT="application/json")
    assert refused.status_code == 403 and b"CSRF" in refused.content
    generation.refresh_from_db()
    assert (generation.status, generation.stop_requested) == ("queued", False), "nothing changed"

    strict.get(f"/playground/?ids={generation.pk}")  # sets the CSRF cookie, as the page does
    token = strict.cookies[django_settings.CSRF_COOKIE_NAME].value
    answer = strict.post(stop_url(generation), {"csrfmiddlewaretoken": token}, HTTP_ACCEPT="application/json")
    assert answer.status_code == 200
    assert answer.json() == {"generation": generation.pk, "status": "stopped", "stop_requested": True, "error": ""}
    generation.refresh_from_db()
    assert generation.status == "stopped" and generation.finished_at is not None
    assert generation.error_message == services.STOPPED_BEFORE_START == "stopped by you before it started"
    assert runner.run_generation(generation.pk) is None, "its task, when it comes, does not run it"
    generation.refresh_from_db()
    assert generation.status == "stopped" and generation.output == "" and generation.started_at is None

    # Without a script: back to the page it was pressed on, with a message; never to another site.
    client.force_login(owner)
    again = client.post(stop_url(generation), {"next": f"/playground/?ids={generation.pk},{generation.pk}"},
                        follow=True)
    assert again.redirect_chain == [(f"/playground/?ids={generation.pk},{generation.pk}", 302)]
    assert "This answer has already stopped: only a queued or running one can be stopped." in again.content.decode()
    page = again.content.decode()
    assert stop_button_hidden(page, generation)
    assert 'data-status="stopped"' in page and "stopped by you before it started" in page
    for elsewhere in ("https://elsewhere.example/", "//elsewhere.example/playground/", "/jobs/"):
        response = client.post(stop_url(generation), {"next": elsewhere})
        assert response["Location"] == f"/playground/?ids={generation.pk}", elsewhere
    assert client.post(stop_url(generation), HTTP_ACCEPT="application/json").status_code == 409


def test_a_running_generation_stops_between_tokens_keeping_its_text(client, owner, registered_trunk, web_trunk,
                                                                     celery_worker, redis_server, settings):
    from webapp.settings import channel_layer_host

    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer",
                                           "CONFIG": {"hosts": [channel_layer_host(redis_server.url)]}}}
    prompt = "hello, how are you?"
    generation = Generation.objects.create(owner=owner, base_model=TINY_MODEL_ID, prompt=prompt, chat=True,
                                           max_new_tokens=64)
    client.force_login(owner)

    def start_and_stop() -> dict:
        # The trunk is frozen while the worker takes the generation: it cannot produce a token before
        # the stop is asked, so the stop lands between tokens, after the first one, every time.
        os.kill(web_trunk.pid, signal.SIGSTOP)
        try:
            generate.delay(generation.pk)
            wait_until(lambda: Generation.objects.get(pk=generation.pk).status != "queued",
                       "the worker takes the generation", timeout=60)
            answer = client.post(stop_url(generation), HTTP_ACCEPT="application/json")
        finally:
            os.kill(web_trunk.pid, signal.SIGCONT)
        assert answer.status_code == 200, answer.content
        return answer.json()

    async def watch():
        communicator = WebsocketCommunicator(application, f"/ws/generations/{generation.pk}/",
                                             headers=socket_headers(client))
        accepted, _ = await communicator.connect(timeout=10)
        assert accepted
        events = [await communicator.receive_json_from(timeout=10)]
        answer = await sync_to_async(start_and_stop)()
        while events[-1]["type"] != "done":
            events.append(await communicator.receive_json_from(timeout=60))
        await communicator.disconnect()
        return answer, events

    answer, events = async_to_sync(watch)()
    assert answer == {"generation": generation.pk, "status": "running", "stop_requested": True, "error": ""}
    (generation,) = wait_for_generations([generation.pk], celery_worker)
    assert generation.status == "stopped", (generation.status, generation.error_message)
    assert generation.error_message == "stopped by you after 1 token; the text so far is kept"
    assert (generation.output, generation.token_count) == local_answer(prompt, True, 1)
    assert {"type": "status", "generation": generation.pk, "status": "running", "stop_requested": True} in events
    text, done = assemble(events)
    assert done == {"type": "done", "generation": generation.pk, "status": "stopped", "text": generation.output,
                    "error_message": generation.error_message, "token_count": 1}
    assert text == generation.output

    page = client.get(f"/playground/?ids={generation.pk}").content.decode()
    assert 'data-status="stopped"' in page and escape(generation.error_message) in page
    assert stop_button_hidden(page, generation)


def test_the_page_lists_the_users_recent_comparisons(client, owner, other, web_dirs):
    job = Job.objects.create(owner=owner, name="sums <v2>", dataset_name="sums", base_model=TINY_MODEL_ID,
                             status="succeeded")
    common = dict(owner=owner, base_model=TINY_MODEL_ID, status="succeeded")
    alone = Generation.objects.create(prompt="only the base model", **common)
    base = Generation.objects.create(prompt="x" * 100 + "\nmore", **common)
    adapted = Generation.objects.create(prompt=base.prompt, job=job, paired_with=base, **{**common,
                                                                                           "status": "failed"})
    Generation.objects.create(owner=other, base_model=TINY_MODEL_ID, prompt="theirs, not to be shown")

    client.force_login(owner)
    response = client.get("/playground/")
    page = response.content.decode()
    listed = response.context["history"]
    assert [comparison.ids for comparison in listed] == [[base.pk, adapted.pk], [alone.pk]], "newest first"
    assert "theirs, not to be shown" not in page
    assert escape("sums <v2>") in page and "sums <v2>" not in page
    assert f'href="/playground/?ids={base.pk},{adapted.pk}"' in page and f'href="/playground/?ids={alone.pk}"' in page
    row = page[page.index(f'data-comparison="{base.pk}"'):]
    row = re.sub(r"\s+", " ", row[:row.index("</tr>")])
    assert "x" * 79 + "…</a>" in row, "a long prompt is cut"
    assert f'status-succeeded" title="Base model" data-history-of="{base.pk}">succeeded' in row
    assert f'status-failed" title="With adapter: sums &lt;v2&gt;" data-history-of="{adapted.pk}">failed' in row
    stamp = f'<time datetime="{date_filter(base.created_at, "c")}">{date_filter(base.created_at, "Y-m-d H:i")}</time>'
    assert stamp in row and re.search(r">\d{4}-\d\d-\d\d \d\d:\d\d</time>", row)

    # Capped: the newest HISTORY_SIZE, and a note that says so.
    Generation.objects.bulk_create([Generation(prompt=f"more {i}", **common) for i in range(HISTORY_SIZE)])
    response = client.get(f"/playground/?ids={alone.pk}")
    listed = response.context["history"]
    assert len(listed) == HISTORY_SIZE and alone.pk not in {pk for comparison in listed for pk in comparison.ids}
    assert f"The {HISTORY_SIZE} most recent." in response.content.decode()
    client.force_login(other)
    assert [c.prompt for c in client.get("/playground/").context["history"]] == ["theirs, not to be shown"]


def test_a_job_without_an_adapter_is_named_not_silently_replaced(client, owner, other, web_dirs):
    up_trunk()
    jobs = {status: Job.objects.create(owner=owner, name=f"run <{status}>", dataset_name="sums",
                                       base_model=TINY_MODEL_ID, status=status)
            for status in ("cancelled", "failed", "running", "queued", "succeeded")}
    ready = Job.objects.create(owner=owner, name="ready", dataset_name="sums", base_model=TINY_MODEL_ID,
                               status="succeeded", chat_format=False)
    add_adapter_files(ready)
    theirs = Job.objects.create(owner=other, name="their secret run", dataset_name="sums", base_model=TINY_MODEL_ID,
                                status="succeeded")
    add_adapter_files(theirs)
    client.force_login(owner)

    expected = {
        "cancelled": "was cancelled, so it has no adapter: only succeeded jobs can be tried.",
        "failed": "failed, so it has no adapter: only succeeded jobs can be tried.",
        "running": "is running, so it has no adapter yet: only succeeded jobs can be tried.",
        "queued": "is queued, so it has no adapter yet: only succeeded jobs can be tried.",
        "succeeded": "succeeded, but its adapter is not on this server, so it cannot be tried",
    }
    for status, ending in expected.items():
        job = jobs[status]
        response = client.get(f"/playground/?job={job.pk}")
        assert response.status_code == 200
        message = escape(f"Job {job.pk} (run <{status}>) {ending}")
        assert f'<p class="error" id="job-problem">{message}' in response.content.decode(), status
        assert response.context["form"].initial.get("job") is None, "no job is chosen in its place"

    not_found = "There is no such job of yours: choose one of your succeeded jobs below."
    for job_id in (theirs.pk, 999_999, 10**30, "x"):
        response = client.get(f"/playground/?job={job_id}")
        page = response.content.decode()
        assert response.status_code == 200 and not_found in page, job_id
        assert "their secret run" not in page and response.context["form"].initial.get("job") is None

    response = client.get(f"/playground/?job={ready.pk}")
    assert 'id="job-problem"' not in response.content.decode()
    assert response.context["form"].initial["job"] == ready.pk and response.context["form"].initial["chat"] is False
    assert 'id="job-problem"' not in client.get("/playground/").content.decode()


def test_jobs_are_picked_by_name_and_the_chat_box_follows_how_they_trained(client, owner, web_dirs):
    up_trunk()
    assert services.has_chat_template(TINY_MODEL_ID), "the tiny model's tokenizer has a chat template"
    chatty = Job.objects.create(owner=owner, name="chatty", dataset_name="sums", base_model=TINY_MODEL_ID,
                                status="succeeded", chat_format=True)
    plain = Job.objects.create(owner=owner, name="plain <text>", dataset_name="sums", base_model=TINY_MODEL_ID,
                               status="succeeded", chat_format=False)
    older = Job.objects.create(owner=owner, dataset_name="older dataset", base_model=TINY_MODEL_ID,
                               status="succeeded", chat_format=None)
    for job in (chatty, plain, older):
        add_adapter_files(job)
    client.force_login(owner)

    response = client.get("/playground/")
    page = response.content.decode()
    hints = {
        chatty: "this job trained with the chat template",
        plain: "this job trained on plain text (no chat template)",
        older: f"this job's format was not recorded; the tokenizer of {TINY_MODEL_ID} has a chat template",
    }
    assert select_options(page, "job") == [
        {"value": "", "label": "Base model only", "selected": "selected"},
        *({"value": str(job.pk), "label": job.display_name, "data-chat": chat, "data-chat-hint": hints[job]}
          for job, chat in ((older, "true"), (plain, "false"), (chatty, "true"))),  # newest first
    ]
    assert older.display_name == "older dataset"
    base_hint = f"the tokenizer of {TINY_MODEL_ID} has a chat template"
    assert select_options(page, "base_model") == [{"value": TINY_MODEL_ID, "label": TINY_MODEL_ID, "data-chat": "true",
                                                   "data-chat-hint": base_hint, "selected": "selected"}]
    assert f'<div class="muted" id="chat-hint">Default: {escape(base_hint)}</div>' in page
    assert response.context["form"].initial["chat"] is True

    for job, chat in ((chatty, True), (plain, False), (older, True)):
        response = client.get(f"/playground/?job={job.pk}")
        page = response.content.decode()
        assert response.context["form"].initial["chat"] is chat, job.display_name
        checkbox = re.search(r'<input type="checkbox" name="chat"[^>]*>', page).group(0)
        assert ("checked" in checkbox) is chat, (job.display_name, checkbox)
        assert f'<div class="muted" id="chat-hint">Default: {escape(hints[job])}</div>' in page
        chosen = [option["value"] for option in select_options(page, "job") if "selected" in option]
        assert chosen == [str(job.pk)]

    generation = Generation.objects.create(owner=owner, job=plain, base_model=TINY_MODEL_ID, prompt="hi",
                                           status="succeeded", output="ok")
    page = client.get(f"/playground/?ids={generation.pk}").content.decode()
    assert '<h2 data-role="label">With adapter: plain &lt;text&gt;</h2>' in page
