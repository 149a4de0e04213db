"""The whole experience in a real headless Chromium against daphne, a Celery worker and a trunk.

Log in, upload a dataset, start a job, watch points arrive without a reload, reload
mid-job and see the whole history, cancel and resume, download the adapter. Screenshots
of the pages go to test-artifacts/.
"""

from __future__ import annotations

import io
import json
import re
import threading
import zipfile

import pytest
from browser_fixtures import ARTIFACTS, browser, log_in, page  # noqa: F401 - fixtures
from playwright.sync_api import expect
from polling import wait_until
from web_fixtures import TINY_MODEL_ID

from webapp.training import services
from webapp.training.models import Job

pytestmark = pytest.mark.django_db(transaction=True)

ROWS = [{"prompt": f"Q: what is {i} plus {i}?\nA:", "completion": f" {2 * i}"} for i in range(40)]


def live_steps(page) -> list[int]:
    return page.evaluate("Array.from(window.jobLive.metrics.keys()).sort((a, b) => a - b)")


def job_list_sockets(web_server) -> int:
    """How many job-list sockets the web server has opened so far. daphne logs WSCONNECT when the consumer
    accepts a socket, which it does once the socket has joined its user's group (webapp/training/consumers.py)."""
    return web_server.log().count('"WSCONNECT /ws/jobs/"')


# What the status line may say before step 1 (it moves on fast; the page sees at least one of these).
PHASES_BEFORE_STEP_1 = {"Queued: waiting for a free worker", "Starting…", "Preparing the examples…",
                        "Connecting to the trunk server local…",
                        "Loading the model and opening a session on local…",
                        "Measuring what the trunk could read (the leakage audit)…", "Training: starting step 1"}
RECORD_PHASES = """
window.phases = [];
document.addEventListener("DOMContentLoaded", () => {
  const line = document.getElementById("job-phase");
  if (!line) return;
  const record = () => { if (line.textContent) window.phases.push(line.textContent); };
  record();
  new MutationObserver(record).observe(line, {childList: true, characterData: true, subtree: true});
});
"""


def test_train_watch_reload_cancel_resume_download(page, django_user_model, registered_trunk, celery_worker,
                                                   web_server, tmp_path):
    log_in(page, django_user_model)
    page.add_init_script(RECORD_PHASES)

    dataset = tmp_path / "sums.jsonl"
    dataset.write_text("\n".join(json.dumps(row) for row in ROWS) + "\n")
    page.goto("/datasets/")
    page.set_input_files("input[type=file]", str(dataset))
    page.click("form[enctype='multipart/form-data'] button[type=submit]")
    expect(page.locator("body")).to_contain_text("40")  # examples, on the dataset page

    # From the dataset's page to the job form, with the dataset chosen.
    page.click("text=Train on this dataset")
    expect(page).to_have_url(re.compile(r"/jobs/new/\?dataset=\d+$"))
    page.select_option("select[name=base_model]", TINY_MODEL_ID)
    # The preset sets the run length and the estimate follows: 40 examples, 4 held out, 4 per step.
    estimate = page.locator("#job-estimate")
    expect(estimate).to_contain_text("27 steps (3 epochs of 36 training examples, 4 per step)")
    expect(estimate).to_contain_text("No job has run on tiny-llama yet")
    page.check("input[name=preset][value=quick]")
    expect(estimate).to_contain_text("18 steps (2 epochs of 36 training examples")
    assert page.input_value("input[name=epochs]") == "2"
    page.fill("input[name=name]", "Sums, fast and long")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "job-form.png"), full_page=True)
    # The rest waits under Advanced; typing a run length there makes the preset "custom".
    expect(page.locator("input[name=max_steps]")).to_be_hidden()
    page.click("#advanced summary")
    # DoRA and rsLoRA are LoRA's flags: another method greys them out.
    expect(page.locator("input[name=use_dora]")).to_be_enabled()
    page.select_option("select[name=adapter_method]", "ia3")
    expect(page.locator("input[name=use_dora]")).to_be_disabled()
    expect(page.locator("input[name=use_rslora]")).to_be_disabled()
    page.select_option("select[name=adapter_method]", "lora")
    expect(page.locator("input[name=use_dora]")).to_be_enabled()
    page.fill("input[name=max_steps]", "400")
    expect(page.locator("input[name=preset][value=custom]")).to_be_checked()
    expect(estimate).to_contain_text("400 steps")
    page.fill("input[name=batch_size]", "2")
    page.fill("input[name=max_seq_length]", "32")
    page.fill("input[name=learning_rate]", "0.01")
    page.fill("input[name=val_fraction]", "0.1")
    # Every connection to the job's socket, and every time the job's page loads.
    sockets: list[str] = []
    loads: list[str] = []
    page.on("websocket", lambda socket: sockets.append(socket.url) if "/ws/jobs/" in socket.url
            and not socket.url.split("?")[0].endswith("/ws/jobs/") else None)
    page.on("load", lambda loaded: loads.append(loaded.url) if re.search(r"/jobs/\d+/$", loaded.url) else None)
    page.click("text=Start training")
    expect(page.locator("#job-live")).to_be_visible()
    job = Job.objects.get()
    expect(page).to_have_url(f"/jobs/{job.pk}/")
    assert job.name == "Sums, fast and long" and job.max_steps == 400 and job.learning_rate == 0.01
    expect(page.locator("#job-name")).to_have_text("Sums, fast and long")
    # Before the first step the page says what the job is doing, then counts the steps.
    expect(page.locator("#job-phase")).to_contain_text("Training: step", timeout=120_000)
    assert set(page.evaluate("window.phases")) & PHASES_BEFORE_STEP_1, page.evaluate("window.phases")
    expect(page.locator("#fact-trunk")).to_contain_text("local (layers")

    # Points arrive without a reload.
    page.wait_for_function("window.jobLive && window.jobLive.metrics.size >= 3")
    first = len(live_steps(page))
    page.wait_for_function(f"window.jobLive.metrics.size > {first}")
    expect(page.locator("#job-status")).to_have_text("running")
    # Elapsed counts from the server's start time and ticks between steps; the time left is shown.
    elapsed = page.inner_text("#elapsed")
    assert re.fullmatch(r"(\d+m )?\d+s", elapsed), elapsed
    page.wait_for_function(f"document.getElementById('elapsed').textContent !== {json.dumps(elapsed)}")
    expect(page.locator("#eta")).not_to_have_text("–")
    # A running job has no adapter yet: its download and playground links stay hidden.
    expect(page.locator("#download-link")).to_be_hidden()
    expect(page.locator("#playground-link")).to_be_hidden()
    expect(page.locator("#merged-model")).to_be_hidden()
    # The worker's leakage audit runs before the first step: its panel fills in without a reload.
    audit = page.locator("#privacy-audit .audit[data-moment=first_step]")
    expect(audit).to_have_count(1)
    # Every attack of the audit without its strong ones: three on the hidden states, two on the gradients.
    expect(audit.locator("tr[data-attack]")).to_have_count(5)
    expect(audit.locator(".audit-headline")).to_contain_text("could read about")
    expect(audit.locator(".audit-headline")).to_contain_text("strong attacks not run")

    # A reload mid-job draws the whole history at once, with no gaps.
    seen = live_steps(page)
    page.reload()
    page.wait_for_function(f"window.jobLive && window.jobLive.metrics.size >= {len(seen)}")
    after_reload = live_steps(page)
    assert after_reload[: len(seen)] == seen == list(range(1, len(seen) + 1))
    assert page.locator("#loss-chart canvas").count() >= 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "job-page-running.png"), full_page=True)

    # A dropped socket reconnects by itself and asks only for what it missed.
    before_drop = page.evaluate("window.jobLive.metrics.size")
    with page.expect_websocket(lambda ws: "after=" in ws.url) as reconnected:
        page.evaluate("window.jobLive.socket.close()")
    assert "/ws/jobs/" in reconnected.value.url
    page.wait_for_function(f"window.jobLive.metrics.size > {before_drop + 2}")

    # Cancel, then resume from the checkpoint; the live page follows both.
    page.click("#cancel-form button")
    expect(page.locator("#job-status")).to_have_text("cancelled", timeout=60_000)
    stopped = Job.objects.get(pk=job.pk).current_step
    assert 0 < stopped < 400
    page.click("#resume-form button")
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=420_000)  # 2 slow shared cores
    # The merged model is offered as the job succeeds, without a reload.
    expect(page.locator("#merged-form button")).to_be_visible()
    steps = live_steps(page)
    assert steps == list(range(1, 401)), "no gaps and no duplicates across reload, cancel and resume"
    assert page.evaluate("window.jobLive.evals.size") >= 1
    expect(page.locator("#log-tail")).to_contain_text(f"resuming from the checkpoint of step {stopped}")
    page.screenshot(path=str(ARTIFACTS / "job-page.png"), full_page=True)

    # One socket per page load, plus the one dropped on purpose: no reconnects of its own, not even
    # across a quiet spell longer than the Redis reads' old 5 s timeout. Waiting is the point here: 12 s
    # must pass with nothing sent.
    page.wait_for_timeout(12_000)
    assert page.evaluate("window.jobLive.socket.readyState") == 1  # open
    assert len(sockets) == len(loads) + 1, (sockets, loads)
    assert "Traceback" not in web_server.log() and "TimeoutError" not in web_server.log()

    with page.expect_download() as info:
        page.click("#download-link")
    download = info.value
    assert download.suggested_filename == f"adapter-job-{job.pk}.zip"
    bundle = zipfile.ZipFile(io.BytesIO(open(download.path(), "rb").read()))
    assert "adapter_model.safetensors" in bundle.namelist() and "README.md" in bundle.namelist()


def test_job_list_updates_statuses_live(page, django_user_model, registered_trunk, celery_worker, web_server,
                                        tmp_path):
    opened = job_list_sockets(web_server)
    log_in(page, django_user_model)  # it ends on the job list, whose socket opens: counted before the next one
    wait_until(lambda: job_list_sockets(web_server) > opened, "the job list's socket after logging in is open")
    owner = django_user_model.objects.get(username="ada")
    job = Job.objects.create(owner=owner, dataset_name="sums", base_model=TINY_MODEL_ID, max_steps=3,
                             status=Job.Status.QUEUED)
    opened = job_list_sockets(web_server)
    page.goto("/jobs/")
    row = page.locator(f"tr[data-job='{job.pk}']")
    expect(row.locator(".status")).to_have_text("queued")
    wait_until(lambda: job_list_sockets(web_server) > opened, "the job list's socket is open")
    # From another thread, as a web process would: this one runs Playwright's event loop.
    canceller = threading.Thread(target=services.cancel_job, args=(job,))
    canceller.start()
    canceller.join(30)
    expect(row.locator(".status")).to_have_text("cancelled", timeout=20_000)


def test_the_job_form_shows_what_the_chosen_privacy_setting_let_a_trunk_owner_read(page, django_user_model,
                                                                                  registered_trunk):
    from splitcore.privacy.attack_names import HIDDEN_STATES, channel_rate
    from splitcore.privacy.measured import measured_points

    log_in(page, django_user_model)
    page.goto("/jobs/new/")
    measured = page.locator("#privacy-measured")
    undefended = measured_points()[0]
    # The tiny model starts undefended at its trunk's default cut: the first measured row.
    expect(measured).to_contain_text(f"({undefended.name})")
    hidden = channel_rate(undefended.rates, HIDDEN_STATES)
    expect(measured).to_contain_text(f"the best attack read {hidden:.1%} of the tokens from the hidden states")
    page.fill("input[name=bottom_layers]", "8")
    page.fill("input[name=top_layers]", "16")
    expect(measured).to_contain_text("(Bottom 8 + Top 16 blocks)")
    expect(page.locator("#privacy-table tr.chosen")).to_contain_text("Bottom 8 + Top 16 blocks")
    page.fill("input[name=hidden_noise]", "0.123")
    expect(measured).to_contain_text("This exact setting was not measured")
    expect(page.locator("#privacy-table tr.chosen")).to_have_count(0)
