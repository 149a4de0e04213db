"""A job on a chain of trunks in a real headless Chromium against daphne: the job page and the
fleet page draw each link, its blocks and its state, and follow a link's state live (chain.js
draws the line the server renders in trunks/_chain_link.html)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from browser_fixtures import browser, page  # noqa: F401 - fixtures
from django.db import connection
from playwright.sync_api import expect

from webapp.training import events
from webapp.training.models import Job, JobLink
from webapp.trunks import fleet
from webapp.trunks.models import TrunkServer

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "chain-admin-password-1"


def outside_the_page_loop(publish, *args) -> None:
    """Publish from another thread: Playwright's sync API keeps an event loop in this one, where Channels'
    async_to_sync refuses to run."""

    def run() -> None:
        try:
            publish(*args)
        finally:
            connection.close()

    with ThreadPoolExecutor(1) as pool:
        pool.submit(run).result()


def link_record(name: str, first: int, last: int) -> TrunkServer:
    """A trunk whose last check found it up, serving blocks ``first``-``last`` of the tiny model's 6."""
    return TrunkServer.objects.create(
        name=name, address=f"{name}.example:50051", token="t" * 24, status=TrunkServer.Status.UP, model_id="llama",
        model_type="llama", num_layers=6, trunk_start=first, trunk_end=last + 1, min_trunk_start=first,
        max_trunk_end=last + 1, max_sessions=4, active_sessions=1, latency_ms=5.0)


def test_the_job_page_and_the_fleet_page_follow_a_chain_live(page, django_user_model, web_server):
    staff = django_user_model.objects.create_user("root", password=PASSWORD, is_staff=True, is_superuser=True)
    first, second = link_record("link-a", 1, 2), link_record("link-b", 3, 4)
    job = Job.objects.create(owner=staff, dataset_name="sums", base_model="llama", trunk=first, name="chained",
                             status=Job.Status.RUNNING, bottom_layers=1, top_layers=1)
    for position, (trunk, start, end) in enumerate([(first, 1, 2), (second, 3, 4)]):
        JobLink.objects.create(job=job, position=position, trunk=trunk, trunk_name=trunk.name, first_block=start,
                               last_block=end)
    page.goto("/accounts/login/")
    page.fill("input[name=username]", "root")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    expect(page).to_have_url("/jobs/")

    page.goto(f"/jobs/{job.pk}/")
    chain = page.locator("#job-chain")
    expect(chain.locator("li")).to_have_count(2)
    expect(chain.locator('li[data-link="2"]')).to_have_text("link 2: link-b blocks 3-4 up")
    page.evaluate("window.notReloaded = true")  # gone if the page ever reloads
    TrunkServer.objects.filter(pk=second.pk).update(draining=True)
    outside_the_page_loop(events.publish_status, Job.objects.get(pk=job.pk))
    expect(chain.locator('li[data-link="2"] .status')).to_have_text("draining")
    expect(chain.locator('li[data-link="2"] .status')).to_have_class("status status-draining")
    expect(chain.locator('li[data-link="1"]')).to_have_text("link 1: link-a blocks 1-2 up")
    assert page.evaluate("window.notReloaded") is True

    page.goto("/fleet/")
    expect(page.locator("#fleet-live")).to_contain_text("live · updated")
    listed = page.locator(f'#fleet-chains li[data-job="{job.pk}"]')
    expect(listed).to_contain_text(f"job {job.pk}: chained")
    expect(listed.locator('li[data-link="2"]')).to_have_text("link 2: link-b blocks 3-4 draining")
    page.evaluate("window.notReloaded = true")
    TrunkServer.objects.filter(pk=second.pk).update(draining=False, status=TrunkServer.Status.DOWN)
    outside_the_page_loop(fleet.publish)
    expect(listed.locator('li[data-link="2"] .status')).to_have_text("down")
    Job.objects.filter(pk=job.pk).update(status=Job.Status.SUCCEEDED)
    outside_the_page_loop(fleet.publish)
    expect(page.locator("#fleet-chains")).to_be_hidden()  # no running job on a chain any more
    assert page.evaluate("window.notReloaded") is True
