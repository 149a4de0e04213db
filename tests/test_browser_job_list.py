"""In the browser: the job list adds a job created elsewhere and follows its steps live (never another user's
job), and the job form's estimate and privacy table read well (thousands grouped, a warning past a day, the cut on
one line)."""

from __future__ import annotations

import json
import threading

import pytest
from browser_fixtures import ARTIFACTS, browser, log_in, page  # noqa: F401 - fixtures
from django.core.files.uploadedfile import SimpleUploadedFile
from playwright.sync_api import expect
from polling import wait_until
from rest_framework.test import APIClient
from web_fixtures import TINY_MODEL_ID

from webapp.datasets.models import Dataset
from webapp.datasets.services import create_dataset
from webapp.training import services
from webapp.training.models import Job, MetricPoint

pytestmark = pytest.mark.django_db(transaction=True)

ROWS = [{"prompt": f"Q: what is {i} plus {i}?\nA:", "completion": f" {2 * i}"} for i in range(40)]
STEPS = 6
# Every text the progress cells take, in order, as "job:text" (a step's progress is gone again in milliseconds).
RECORD_PROGRESS = """
window.progressSeen = [];
document.addEventListener("DOMContentLoaded", () => {
  const table = document.getElementById("job-table");
  const record = () => table.querySelectorAll(".progress-cell").forEach((cell) => {
    const seen = `${cell.closest("tr").dataset.job}:${cell.textContent}`;
    if (!window.progressSeen.includes(seen)) window.progressSeen.push(seen);
  });
  new MutationObserver(record).observe(table, {subtree: true, childList: true, characterData: true});
});
"""


def job_list_sockets(web_server) -> int:
    """How many job-list sockets daphne has accepted so far (it accepts once the socket joined its group)."""
    return web_server.log().count('"WSCONNECT /ws/jobs/"')


def in_another_thread(work):
    """Run ``work`` as a web process would: this thread runs Playwright's event loop, where async_to_sync (the
    channel layer's publish) cannot run."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(value=work()))
    thread.start()
    thread.join(60)
    assert "value" in result, "the work in the other thread did not finish"
    return result["value"]


def api_create(user, dataset, **fields) -> int:
    api = APIClient()
    api.force_authenticate(user)
    response = api.post("/api/jobs/", {"dataset": dataset.pk, **fields}, format="json")
    assert response.status_code == 201, response.content
    return response.json()["id"]


def sums(user) -> Dataset:
    content = ("\n".join(json.dumps(row) for row in ROWS) + "\n").encode()
    return create_dataset(user, SimpleUploadedFile("sums.jsonl", content), "sums")


def test_the_list_adds_a_job_created_elsewhere_and_follows_its_steps(page, django_user_model, registered_trunk,
                                                                     celery_worker, web_server):
    page.add_init_script(RECORD_PROGRESS)
    opened = job_list_sockets(web_server)
    log_in(page, django_user_model)  # it ends on the (empty) job list
    wait_until(lambda: job_list_sockets(web_server) > opened, "the job list's socket is open")
    expect(page.locator("#jobs-empty")).to_be_visible()
    ada = django_user_model.objects.get(username="ada")
    other = django_user_model.objects.create_user("other", password="other-pass-123")

    # Another user's job comes and goes first: its events go to that user's list only.
    theirs = in_another_thread(lambda: services.cancel_job(Job.objects.get(
        pk=api_create(other, sums(other), max_steps=STEPS))).pk)
    mine = in_another_thread(lambda: api_create(ada, sums(ada), name="made by the API", max_steps=STEPS,
                                                batch_size=4, max_seq_length=64))

    row = page.locator(f"tr[data-job='{mine}']")
    expect(row.locator("a")).to_have_text("made by the API")
    expect(row.locator("a")).to_have_attribute("href", f"/jobs/{mine}/")
    expect(row).to_contain_text("sums")
    expect(row).to_contain_text(TINY_MODEL_ID)
    expect(page.locator("#jobs-empty")).to_have_count(0)
    expect(row.locator(".status")).to_have_text("succeeded", timeout=180_000)
    expect(row.locator(".progress-cell")).to_have_text(f"{STEPS} / {STEPS}")
    expect(row.locator(".loss-cell")).to_have_text(
        f"{Job.objects.get(pk=mine).last_loss:.4f}")
    seen = page.evaluate("window.progressSeen")
    between = [text for text in seen if text.startswith(f"{mine}:") and text.split(":")[1] not in
               ("0", f"0 / {STEPS}", f"{STEPS} / {STEPS}")]
    assert between, f"the progress moved only at the start and the end: {seen}"
    assert page.locator(f"tr[data-job='{theirs}']").count() == 0, "another user's job is never listed"
    assert not [text for text in seen if text.startswith(f"{theirs}:")]
    page.screenshot(path=str(ARTIFACTS / "job-list-live.png"), full_page=True)


def test_the_form_groups_thousands_and_warns_of_a_run_over_a_day(page, django_user_model, registered_trunk):
    log_in(page, django_user_model)
    ada = django_user_model.objects.get(username="ada")
    big = Dataset.objects.create(owner=ada, name="big", file="datasets/big.jsonl", original_filename="big.jsonl",
                                 file_format="jsonl", kind="prompt_completion", num_examples=97_000, size_bytes=1,
                                 sha256="0" * 64)
    # A finished job measured 7.5 s per step of 4 examples on the model (no start-up time: it has no start).
    measured = Job.objects.create(owner=ada, dataset_name="earlier", base_model=TINY_MODEL_ID, max_steps=10,
                                  batch_size=4, grad_accum_steps=1, status=Job.Status.SUCCEEDED, current_step=10,
                                  attempts=1)
    MetricPoint.objects.bulk_create([MetricPoint(job=measured, step=step, kind=MetricPoint.Kind.TRAIN, loss=1.0,
                                                 elapsed_s=7.5 * step) for step in range(1, 11)])

    page.set_viewport_size({"width": 760, "height": 1000})
    page.goto(f"/jobs/new/?dataset={big.pk}")
    page.select_option("select[name=base_model]", TINY_MODEL_ID)
    estimate = page.locator("#job-estimate")
    # Balanced: 3 epochs of the 87,300 examples left after holding out 10%, 4 per step.
    expect(estimate).to_contain_text("65,475 steps (3 epochs of 87,300 training examples, 4 per step)")
    expect(estimate).to_contain_text("more than a day of training")
    expect(estimate).to_contain_text("choose Quick look (about")
    expect(estimate).to_contain_text("set max steps to 11,520 or fewer")
    expect(estimate).to_have_class("estimate warning")
    page.screenshot(path=str(ARTIFACTS / "job-form-long-run.png"), full_page=True)
    page.click("#advanced summary")
    page.fill("input[name=max_steps]", "1000")
    expect(estimate).to_contain_text("1,000 steps, about 2 h 5 min")
    expect(estimate).not_to_contain_text("more than a day")
    expect(estimate).to_have_class("estimate")

    page.click("#privacy-table summary")
    cuts = page.locator("#privacy-table tbody tr td:nth-child(2)")
    assert cuts.count() > 0
    lines = page.evaluate("""() => Array.from(document.querySelectorAll('#privacy-table tbody tr td:nth-child(2)'))
        .map((cell) => { const range = document.createRange(); range.selectNodeContents(cell);
                         return [cell.textContent, new Set(Array.from(range.getClientRects()).map((r) => r.top)).size]; })""")
    assert all(count == 1 for _, count in lines), f"a cut wraps at 760 px: {lines}"
