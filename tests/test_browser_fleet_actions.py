"""The fleet page's actions, charts and spacing, and the admin's trunk list, in a real headless Chromium against
daphne at 1280 px.

The actions answer in place (no reload): the row shows the new state and the answer, a refusal shows on the row;
the charts have y-axis values and a readout under the pointer; the admin list fits 1280 px and shows its dates
in the site's format. Screenshots go to test-artifacts/fleet-actions.png and admin-trunks.png.
"""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from browser_fixtures import ARTIFACTS, browser, page  # noqa: F401 - fixtures
from django.utils import timezone
from playwright.sync_api import expect

from webapp.training.models import Job
from webapp.trunks.models import HealthSample, TrunkServer

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "fleet-actions-password-1"
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SITE_TIME = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d(:\d\d)?$")  # static/js/times.js


def make_trunk(name: str, **fields) -> TrunkServer:
    defaults = dict(address=f"{name}.trunks.example.internal:50051", token=f"token-of-{name}-0000",
                    status=TrunkServer.Status.UP, model_id=MODEL_ID, max_sessions=4, active_sessions=1,
                    latency_ms=12.5, last_checked_at=timezone.now())
    return TrunkServer.objects.create(name=name, **{**defaults, **fields})


def log_in_as_staff(page, django_user_model) -> None:
    django_user_model.objects.create_superuser("root", password=PASSWORD)
    page.goto("/accounts/login/")
    page.fill("input[name=username]", "root")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    expect(page).to_have_url("/jobs/")


def card(page, name: str):
    return page.locator("article.trunk").filter(has=page.locator(f'[data-field="name"]:text-is("{name}")'))


def test_fleet_actions_answer_in_place_and_the_charts_read_out(page, django_user_model):
    log_in_as_staff(page, django_user_model)
    trunk = make_trunk("alpha")
    make_trunk("beta", status=TrunkServer.Status.DOWN, last_error="cannot reach beta.trunks.example.internal:50051")
    Job.objects.create(owner=django_user_model.objects.get(username="root"), dataset_name="sums", base_model=MODEL_ID,
                       status=Job.Status.RUNNING, trunk=trunk, name="sums run")
    now = timezone.now()
    for minutes, latency in enumerate((8.0, 30.0, 12.0, 45.0, 20.0)):
        HealthSample.objects.create(trunk=trunk, checked_at=now - timedelta(minutes=50 - 10 * minutes), up=True,
                                    latency_ms=latency, active_sessions=1, max_sessions=4)

    page.goto("/fleet/")
    page.evaluate("window.notReloaded = true")  # gone if the page reloads
    alpha = card(page, "alpha")

    # The latency chart has y-axis values up to its largest sample, and hovering reads a sample out.
    chart = alpha.locator('[data-chart="latency_ms"]')
    expect(chart).to_have_attribute("data-y-ticks", re.compile(r"^0( \d+)+$"))
    ticks = [int(value) for value in chart.get_attribute("data-y-ticks").split()]
    assert len(ticks) >= 3 and 45 / 2 <= ticks[-1] <= 45 * 1.15, ticks  # up to the largest sample (45 ms)
    box = chart.locator(".u-over").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.35, box["y"] + box["height"] / 2)
    expect(chart.locator(".u-legend")).to_contain_text(re.compile(r"Latency\s*\d+\.\d ms"))
    expect(chart.locator(".u-legend")).to_contain_text(re.compile(r"checked\s*\d\d:\d\d:\d\d"))

    # The facts end well above the buttons ("Last check" used to touch them).
    facts = alpha.locator("dl.facts").bounding_box()
    buttons = alpha.locator(".trunk-actions").bounding_box()
    assert buttons["y"] - (facts["y"] + facts["height"]) >= 12, (facts, buttons)

    # Drain: the row turns draining in place, says what is left in words, and shows the answer.
    alpha.locator('form[data-action="drain"] button').click()
    expect(alpha.locator('[data-field="action_message"]')).to_contain_text(
        "Trunk alpha is draining: no new sessions open there; its 1 running job goes on (or move it).")
    expect(alpha.locator('[data-field="status"]')).to_have_text("draining")
    expect(alpha.locator('[data-field="drain_state"]')).to_have_text("1 job and 1 session left")
    expect(alpha.locator('form[data-action="end-drain"]')).to_be_visible()
    expect(alpha.locator('form[data-action="drain"]')).to_be_hidden()
    trunk.refresh_from_db()
    assert trunk.draining
    page.screenshot(path=str(ARTIFACTS / "fleet-actions.png"), full_page=True)

    # End the drain, in place as well.
    alpha.locator('form[data-action="end-drain"] button').click()
    expect(alpha.locator('[data-field="action_message"]')).to_have_text("Trunk alpha takes new sessions again.")
    expect(alpha.locator('[data-field="drain_state"]')).to_be_hidden()
    expect(alpha.locator('[data-field="status"]')).to_have_text("up")

    # A refusal shows on the row: the trunk was removed meanwhile (in the admin, by someone else).
    beta = card(page, "beta")
    TrunkServer.objects.filter(name="beta").delete()
    beta.locator('form[data-action="disable"] button').click()
    message = beta.locator('[data-field="action_message"]')
    expect(message).to_contain_text(re.compile(r"Trunk server \d+ is gone: it was removed meanwhile\."))
    expect(message).to_have_class(re.compile(r"\brefused\b"))
    assert page.evaluate("window.notReloaded") is True


def test_the_admin_trunk_list_fits_1280_px_and_shows_site_dates(page, django_user_model):
    log_in_as_staff(page, django_user_model)
    make_trunk("gpu-box-frankfurt-01", last_error="cannot reach gpu-box-frankfurt-01.trunks.example.internal:50051: "
                                                  "connection refused (is the trunk server running?)")
    make_trunk("gpu-box-frankfurt-02", draining=True, draining_since=timezone.now())
    page.goto("/admin/trunks/trunkserver/")
    expect(page.locator("#result_list")).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "admin-trunks.png"), full_page=True)
    overflow = page.evaluate("""() => {
        const results = document.querySelector('#changelist .results');
        const cells = [...document.querySelectorAll('#result_list tr > *')];
        return {scroll: results.scrollWidth - results.clientWidth, page: document.documentElement.scrollWidth,
                right: Math.max(...cells.map((cell) => cell.getBoundingClientRect().right))};
    }""")
    assert overflow["scroll"] <= 0 and overflow["page"] <= 1280 and overflow["right"] <= 1280, overflow
    dates = page.locator("#result_list td.field-last_check time")
    expect(dates).to_have_count(2)
    for text in dates.all_inner_texts():
        assert SITE_TIME.match(text), text
