"""The fleet page in a real headless Chromium against daphne, a Celery worker and two trunk processes.

Staff open the page; without a reload it shows the job that starts on a trunk, the health checks
the worker runs (last check, latency and throughput), and a drain pressed on another page; the
job leaves its trunk's row when it ends. The screenshot goes to test-artifacts/fleet.png.
"""

from __future__ import annotations

import json
import re

import pytest
from browser_fixtures import ARTIFACTS, browser, page  # noqa: F401 - fixtures
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from playwright.sync_api import expect
from web_fixtures import TINY_MODEL_ID, wait_for_job
from web_services import start_worker

from splitcore.remote.process import start_trunk
from webapp.datasets.services import create_dataset
from webapp.training import services
from webapp.training.models import Job
from webapp.trunks.health import check_trunk
from webapp.trunks.models import TrunkServer
from webapp.trunks.tasks import check_all

pytestmark = pytest.mark.django_db(transaction=True)

ROWS = [{"prompt": f"Q: what is {i} plus {i}?\nA:", "completion": f" {2 * i}"} for i in range(40)]
PASSWORD = "fleet-admin-password-1"


@pytest.fixture
def control_worker(service_env, web_dirs):
    """Health checks run here while the session's worker trains (as under make run: a worker per queue)."""
    worker = start_worker(service_env, web_dirs["logs"] / "fleet-control-worker.log", name="fleet-control",
                          queues=[settings.CONTROL_QUEUE])
    yield worker
    worker.stop()


@pytest.fixture
def second_trunk(web_dirs, tmp_path):
    process = start_trunk(web_dirs["models"] / TINY_MODEL_ID, tmp_path, "--max-sessions", "2")
    record = TrunkServer.objects.create(name="second", address=process.address, token=process.token)
    check_trunk(record)
    assert record.status == TrunkServer.Status.UP, record.last_error
    yield record
    process.stop()


def card(page, name: str):
    return page.locator("article.trunk").filter(has=page.locator(f'[data-field="name"]:text-is("{name}")'))


def updates(page) -> int:
    return int(page.get_attribute("#fleet-live", "data-updates"))


def test_the_fleet_page_follows_jobs_checks_and_drains_live(page, django_user_model, registered_trunk, second_trunk,
                                                           celery_worker, control_worker, web_server):
    admin = django_user_model.objects.create_superuser("root", password=PASSWORD)
    page.goto("/accounts/login/")
    page.fill("input[name=username]", "root")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    expect(page).to_have_url("/jobs/")
    page.click("nav >> text=Fleet")
    expect(page).to_have_url("/fleet/")
    expect(page.locator("#fleet-live")).to_contain_text("live · updated")
    page.evaluate("window.notReloaded = true")  # gone if the page ever reloads
    for name in ("local", "second"):
        expect(card(page, name).locator('[data-field="status"]')).to_have_text("up")
        expect(card(page, name).locator('[data-field="jobs"]')).to_have_text("none")
    expect(card(page, "second").locator('[data-field="sessions"]')).to_have_text("0 of 2")

    # A job starts: the row of the trunk it runs on lists it, live.
    data = "".join(json.dumps(row) + "\n" for row in ROWS).encode()
    dataset = create_dataset(admin, SimpleUploadedFile("sums.jsonl", data), name="sums")
    job = services.create_job(Job(owner=admin, dataset=dataset, base_model=TINY_MODEL_ID, name="long sums",
                                  max_steps=3000, batch_size=2, max_seq_length=32, learning_rate=0.01, lora_r=4,
                                  lora_alpha=8, val_fraction=0.0))
    job = wait_for_job(job.pk, condition=lambda j: j.current_step >= 2 or j.is_finished, timeout=180,
                       worker=celery_worker)
    assert job.status == "running", job.error_message
    busy, idle = ("local", "second") if job.trunk.name == "local" else ("second", "local")
    expect(card(page, busy).locator('[data-field="jobs"] a')).to_have_text(f"job {job.pk}: long sums")
    expect(card(page, idle).locator('[data-field="jobs"]')).to_have_text("none")

    # Two rounds of health checks in the worker (the control queue): latency, sessions and throughput.
    before = updates(page)
    check_all.delay()
    page.wait_for_function(f"Number(document.getElementById('fleet-live').dataset.updates) > {before}")
    job = wait_for_job(job.pk, condition=lambda j: j.current_step >= job.current_step + 3 or j.is_finished,
                       timeout=120)
    before = updates(page)
    check_all.delay()
    page.wait_for_function(f"Number(document.getElementById('fleet-live').dataset.updates) > {before}")
    busy_card = card(page, busy)
    expect(busy_card.locator('[data-field="throughput"]')).to_have_text(re.compile(r"^\d+ tokens/s$"))
    expect(busy_card.locator('[data-field="latency"]')).to_have_text(re.compile(r"^\d+\.\d ms$"))
    expect(busy_card.locator('[data-field="sessions"]')).to_contain_text("1 of")
    expect(busy_card.locator('[data-field="last_checked_at"] time')).to_have_count(1)
    assert busy_card.locator(".spark canvas").count() >= 2, "both charts are drawn"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "fleet.png"), full_page=True)

    # Another staff page drains the idle trunk; this one shows it without a reload.
    other = page.context.new_page()
    other.goto("/fleet/")
    card(other, idle).locator('form[data-action="drain"] button').click()
    expect(card(other, idle).locator('[data-field="action_message"]')).to_contain_text(f"Trunk {idle} is draining")
    expect(card(page, idle).locator('[data-field="status"]')).to_have_text("draining")
    expect(card(page, idle).locator('[data-field="drain_state"]')).to_have_text("empty: safe to stop")
    expect(card(page, idle).locator('form[data-action="end-drain"]')).to_be_visible()
    expect(card(page, idle).locator('form[data-action="drain"]')).to_be_hidden()
    expect(card(page, busy).locator('form[data-action="move-jobs"]')).to_be_visible()
    other.close()

    # The job ends: it leaves its trunk's row.
    services.cancel_job(job)
    wait_for_job(job.pk, timeout=120)
    expect(card(page, busy).locator('[data-field="jobs"]')).to_have_text("none")
    expect(card(page, busy).locator('form[data-action="move-jobs"]')).to_be_hidden()
    assert page.evaluate("window.notReloaded === true")
    assert TrunkServer.objects.get(name=idle).draining
