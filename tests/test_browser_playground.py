"""The playground in a real headless Chromium against daphne, a Celery worker and a trunk.

Pick a trained job (the chat box follows it), generate, and check that each panel's socket
brought all of its answer once, however early or late it connected; a repeated event is
skipped and a lost one brings a new snapshot; stop a queued answer from its panel.
Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import defaultdict
from urllib.parse import urlsplit

import polling
import pytest
from browser_fixtures import ARTIFACTS, browser, log_in, page  # noqa: F401 - fixtures
from playground_helpers import assemble, train_job
from playwright.sync_api import expect
from web_fixtures import TINY_MODEL_ID

from webapp.playground import events
from webapp.playground.models import Generation
from webapp.playground.services import base_model_format, job_format

pytestmark = pytest.mark.django_db(transaction=True)

PROMPT = "Q: what is 5 plus 5?\nA:"


class SocketLog:
    """Every WebSocket the page opens, by path, with the JSON frames it received (as Playwright saw them)."""

    def __init__(self, page) -> None:
        self.sockets: dict[str, list] = defaultdict(list)
        self.frames: dict[str, list[dict]] = defaultdict(list)
        page.on("websocket", self._opened)

    def _opened(self, socket) -> None:
        path = urlsplit(socket.url).path
        self.sockets[path].append(socket)
        socket.on("framereceived", lambda payload: self.frames[path].append(json.loads(payload)))

    def ended(self, path: str) -> bool:
        """The socket received the end: a ``done`` event, or a snapshot of an answer that had ended."""
        frames = self.frames.get(path, [])
        return bool(frames) and (frames[-1]["type"] == "done" or (
            frames[-1]["type"] == "snapshot" and frames[-1]["status"] in Generation.FINISHED))

    def wait_until(self, page, condition, timeout_s: float = 30) -> None:
        """Frames arrive while Playwright is waiting: wait in short steps until ``condition()`` holds."""
        polling.wait_until(condition, "the sockets' frames", timeout=timeout_s, observed=lambda: dict(self.frames),
                   pause=lambda seconds: page.wait_for_timeout(seconds * 1000))


def test_each_panel_shows_all_of_its_answer_once(page, django_user_model, registered_trunk, celery_worker):
    started = time.monotonic()
    log_in(page, django_user_model)
    owner = django_user_model.objects.get(username="ada")
    job = train_job(owner, celery_worker)
    page.goto("about:blank")  # the job list's live socket (and any reconnect of it) ends with its page
    sockets = SocketLog(page)

    page.goto(f"/playground/?job={job.pk}")
    expect(page.locator("#job-problem")).to_have_count(0)
    job_select, chat_box, hint = page.locator("#id_job"), page.locator("#id_chat"), page.locator("#chat-hint")
    expect(job_select).to_have_value(str(job.pk))
    expect(job_select.locator("option:checked")).to_have_text(job.display_name)
    trained, base = job_format(job), base_model_format(TINY_MODEL_ID)
    (expect(chat_box).to_be_checked if trained.chat else expect(chat_box).not_to_be_checked)()
    expect(hint).to_have_text(f"Default: {trained.reason}")
    # The checkbox follows the choice, whatever it was set to by hand.
    chat_box.set_checked(not base.chat)
    job_select.select_option("")
    (expect(chat_box).to_be_checked if base.chat else expect(chat_box).not_to_be_checked)()
    expect(hint).to_have_text(f"Default: {base.reason}")
    chat_box.set_checked(not trained.chat)
    job_select.select_option(str(job.pk))
    (expect(chat_box).to_be_checked if trained.chat else expect(chat_box).not_to_be_checked)()
    expect(hint).to_have_text(f"Default: {trained.reason}")

    page.fill("textarea[name=prompt]", PROMPT)
    page.fill("input[name=max_new_tokens]", "24")
    page.click("form[method=post] button:has-text('Generate')")
    expect(page).to_have_url(re.compile(r"/playground/\?ids=\d+,\d+$"))
    base_generation, adapted = Generation.objects.filter(owner=owner).order_by("id")
    assert page.url.endswith(f"/playground/?ids={base_generation.pk},{adapted.pk}")
    assert (adapted.job_id, adapted.paired_with_id, adapted.chat) == (job.pk, base_generation.pk, trained.chat)

    labels = {base_generation.pk: "Base model", adapted.pk: f"With adapter: {job.display_name}"}
    for generation_id, label in labels.items():
        panel = page.locator(f".panel[data-generation='{generation_id}']")
        expect(panel.locator("[data-role=label]")).to_have_text(label)
        expect(panel).to_have_attribute("data-status", "succeeded", timeout=120_000)
        expect(panel.locator("[data-role=stop]")).to_be_hidden()
    paths = [f"/ws/generations/{generation_id}/" for generation_id in labels]
    sockets.wait_until(page, lambda: all(sockets.ended(path) for path in paths))

    for generation_id, path in zip(labels, paths):
        generation = Generation.objects.get(pk=generation_id)
        assert generation.status == "succeeded", generation.error_message
        # The base model always answers this prompt; the adapter may answer with an end of sequence at once
        # (its training depends on the client secret, which each test run draws anew): then the page must
        # show the empty answer it was sent.
        assert generation.output or generation.job_id is not None, "the base model answers the prompt"
        assembled, last = assemble(sockets.frames[path])
        assert assembled == generation.output, (path, sockets.frames[path])
        assert last["text"] == generation.output and last["token_count"] == generation.token_count
        panel = page.locator(f".panel[data-generation='{generation_id}']")
        assert panel.locator("[data-role=output]").text_content() == generation.output
        count = generation.token_count
        expect(panel.locator("[data-role=tokens]")).to_have_text(f"{count} token{'' if count == 1 else 's'}")
        assert len(sockets.sockets[path]) == 1, f"{path} connected {len(sockets.sockets[path])} times"
    assert sorted(sockets.sockets) == sorted(paths), "no other socket was opened"

    history = page.locator(f"#history tr[data-comparison='{base_generation.pk}']")
    expect(history.locator("a")).to_have_attribute("href", f"/playground/?ids={base_generation.pk},{adapted.pk}")
    expect(history.locator(".status")).to_have_text(["succeeded", "succeeded"])  # followed the panels
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
    token_frames = {path: sum(frame["type"] == "token" for frame in sockets.frames[path]) for path in paths}
    print(f"the playground browser test took {time.monotonic() - started:.1f} s; token frames: {token_frames}")


def publish_from_a_thread(generation: Generation, event: dict) -> None:
    """As the worker would: this thread runs Playwright's event loop, where the channel layer's sync
    wrapper cannot run."""
    sender = threading.Thread(target=events.publish, args=(generation.pk, event))
    sender.start()
    sender.join(30)


def test_the_page_skips_what_it_has_and_resyncs_after_a_lost_event(page, django_user_model, redis_server):
    log_in(page, django_user_model)
    owner = django_user_model.objects.get(username="ada")
    generation = Generation.objects.create(owner=owner, base_model=TINY_MODEL_ID, prompt="hello", max_new_tokens=9,
                                           status=Generation.Status.RUNNING)
    sockets = SocketLog(page)
    path = f"/ws/generations/{generation.pk}/"
    page.goto(f"/playground/?ids={generation.pk}")
    output = page.locator(f".panel[data-generation='{generation.pk}'] [data-role=output]")
    sockets.wait_until(page, lambda: bool(sockets.frames[path]))  # the snapshot: the page is listening

    def store(text: str, token_count: int) -> None:
        Generation.objects.filter(pk=generation.pk).update(output=text, token_count=token_count)

    # In order, with an event sent twice: the repeat is text the page already has.
    hello, world = events.token_event("Hello", 0, 2, 0), events.token_event(" world", 5, 3, 2)
    store("Hello world!", 4)
    for event in (hello, world, hello, events.token_event("!", 11, 4, 3)):
        publish_from_a_thread(generation, event)
    expect(output).to_have_text("Hello world!")
    # An event lost (tokens 4 -> 5): the next one does not follow, so the page asks for a new snapshot.
    store("Hello world! How are", 6)
    publish_from_a_thread(generation, events.token_event(" are", 16, 6, 5))
    expect(output).to_have_text("Hello world! How are")
    sockets.wait_until(page, lambda: len(sockets.frames[path]) >= 7)
    assert len(sockets.sockets[path]) == 2, "one new connection for the new snapshot"
    assert sockets.frames[path][-1] == {**sockets.frames[path][0], "status": "running", "text": "Hello world! How are",
                                        "token_count": 6}
    publish_from_a_thread(generation, events.token_event(" you?", 20, 7, 6))
    expect(output).to_have_text("Hello world! How are you?")

    Generation.objects.filter(pk=generation.pk).update(status=Generation.Status.SUCCEEDED, token_count=7,
                                                       output="Hello world! How are you?")
    generation.refresh_from_db()
    publish_from_a_thread(generation, events.done_event(generation))
    expect(page.locator(f".panel[data-generation='{generation.pk}']")).to_have_attribute("data-status", "succeeded")
    expect(output).to_have_text("Hello world! How are you?")
    assert len(sockets.sockets[path]) == 2


def test_stop_ends_a_queued_answer_on_the_page(page, django_user_model, redis_server):
    log_in(page, django_user_model)
    owner = django_user_model.objects.get(username="ada")
    # Created without its task: it stays queued until stopped.
    generation = Generation.objects.create(owner=owner, base_model=TINY_MODEL_ID, prompt="hello", max_new_tokens=4)
    sockets = SocketLog(page)
    path = f"/ws/generations/{generation.pk}/"

    page.goto(f"/playground/?ids={generation.pk}")
    url = page.url
    panel = page.locator(f".panel[data-generation='{generation.pk}']")
    sockets.wait_until(page, lambda: bool(sockets.frames[path]))  # the snapshot: the page is listening
    assert sockets.frames[path][0]["status"] == "queued"
    panel.locator("[data-role=stop] button").click()

    expect(panel).to_have_attribute("data-status", "stopped")
    expect(panel.locator("[data-role=status]")).to_have_text("stopped")
    expect(panel.locator("[data-role=error]")).to_have_text("stopped by you before it started")
    expect(panel.locator("[data-role=stop]")).to_be_hidden()
    assert page.url == url, "stopped without leaving the page"
    assert [frame["type"] for frame in sockets.frames[path]] == ["snapshot", "done"]
    assert sockets.frames[path][-1]["status"] == "stopped" and len(sockets.sockets[path]) == 1
    generation.refresh_from_db()
    assert generation.status == "stopped"
