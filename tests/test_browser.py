"""The whole experience in a real headless Chromium against uvicorn, a Celery worker and a trunk.

Log in, upload a dataset, start a job, watch points arrive without a reload, reload
mid-job and see the whole history, cancel and resume, download the adapter. Screenshots
of the pages go to test-artifacts/.
"""

from __future__ import annotations

import io
import json
import threading
import zipfile

import pytest
from browser_fixtures import ARTIFACTS, browser, log_in, page  # noqa: F401 - fixtures
from playwright.sync_api import expect
from web_fixtures import TINY_MODEL_ID

from webapp.training import services
from webapp.training.models import Job

pytestmark = pytest.mark.django_db(transaction=True)

ROWS = [{"prompt": f"Q: what is {i} plus {i}?\nA:", "completion": f" {2 * i}"} for i in range(40)]


def live_steps(page) -> list[int]:
    return page.evaluate("Array.from(window.jobLive.metrics.keys()).sort((a, b) => a - b)")


def test_train_watch_reload_cancel_resume_download(page, django_user_model, registered_trunk, celery_worker,
                                                   tmp_path):
    log_in(page, django_user_model)

    dataset = tmp_path / "sums.jsonl"
    dataset.write_text("\n".join(json.dumps(row) for row in ROWS) + "\n")
    page.goto("/datasets/")
    page.set_input_files("input[type=file]", str(dataset))
    page.click("form[enctype='multipart/form-data'] button[type=submit]")
    expect(page.locator("body")).to_contain_text("40")  # examples, on the dataset page

    page.goto("/jobs/new/")
    page.select_option("select[name=base_model]", TINY_MODEL_ID)
    page.fill("input[name=max_steps]", "400")
    page.fill("input[name=batch_size]", "2")
    page.fill("input[name=max_seq_length]", "32")
    page.fill("input[name=learning_rate]", "0.01")
    page.fill("input[name=val_fraction]", "0.1")
    page.click("text=Start training")
    expect(page.locator("#job-live")).to_be_visible()
    job = Job.objects.get()
    expect(page).to_have_url(f"/jobs/{job.pk}/")

    # Points arrive without a reload.
    page.wait_for_function("window.jobLive && window.jobLive.metrics.size >= 3")
    first = len(live_steps(page))
    page.wait_for_function(f"window.jobLive.metrics.size > {first}")
    expect(page.locator("#job-status")).to_have_text("running")
    # The worker's leakage audit runs before the first step: its panel fills in without a reload.
    audit = page.locator("#privacy-audit .audit[data-moment=first_step]")
    expect(audit).to_have_count(1)
    expect(audit.locator("tr[data-attack]")).to_have_count(3)
    expect(audit.locator(".audit-headline")).to_contain_text("could read about")

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
    steps = live_steps(page)
    assert steps == list(range(1, 401)), "no gaps and no duplicates across reload, cancel and resume"
    assert page.evaluate("window.jobLive.evals.size") >= 1
    expect(page.locator("#log-tail")).to_contain_text(f"resuming from the checkpoint of step {stopped}")
    page.screenshot(path=str(ARTIFACTS / "job-page.png"), full_page=True)

    with page.expect_download() as info:
        page.click("#download-link")
    download = info.value
    assert download.suggested_filename == f"adapter-job-{job.pk}.zip"
    bundle = zipfile.ZipFile(io.BytesIO(open(download.path(), "rb").read()))
    assert "adapter_model.safetensors" in bundle.namelist() and "README.md" in bundle.namelist()


def test_job_list_updates_statuses_live(page, django_user_model, registered_trunk, celery_worker, tmp_path):
    log_in(page, django_user_model)
    owner = django_user_model.objects.get(username="ada")
    job = Job.objects.create(owner=owner, dataset_name="sums", base_model=TINY_MODEL_ID, max_steps=3,
                             status=Job.Status.QUEUED)
    page.goto("/jobs/")
    row = page.locator(f"tr[data-job='{job.pk}']")
    expect(row.locator(".status")).to_have_text("queued")
    page.wait_for_timeout(500)  # the socket is open
    # From another thread, as a web process would: this one runs Playwright's event loop.
    canceller = threading.Thread(target=services.cancel_job, args=(job,))
    canceller.start()
    canceller.join(30)
    expect(row.locator(".status")).to_have_text("cancelled", timeout=20_000)


def test_the_job_form_shows_what_the_chosen_privacy_setting_let_a_trunk_owner_read(page, django_user_model,
                                                                                  registered_trunk):
    from splitcore.privacy.measured import measured_points

    log_in(page, django_user_model)
    page.goto("/jobs/new/")
    measured = page.locator("#privacy-measured")
    undefended = measured_points()[0]
    # The tiny model starts undefended at its trunk's default cut: the first measured row.
    expect(measured).to_contain_text(f"({undefended.name})")
    expect(measured).to_contain_text(f"{undefended.rates['exact_search']:.1%} with a candidate search")
    page.fill("input[name=bottom_layers]", "8")
    page.fill("input[name=top_layers]", "16")
    expect(measured).to_contain_text("(Bottom 8 + Top 16 blocks)")
    expect(page.locator("#privacy-table tr.chosen")).to_contain_text("Bottom 8 + Top 16 blocks")
    page.fill("input[name=hidden_noise]", "0.123")
    expect(measured).to_contain_text("This exact setting was not measured")
    expect(page.locator("#privacy-table tr.chosen")).to_have_count(0)
