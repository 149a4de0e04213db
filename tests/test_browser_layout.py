"""The studio's layout in headless Chromium, at a phone's width (390 px) and a laptop's (1280 px).

Every main page fits its window (no horizontal scroll) and every link of the navigation bar is on screen;
the loss charts label whole steps and their legends show the latest values; the compare page lists the
runs in one order; the playground's answer cards are equally tall and the base model follows the chosen
job. Screenshots of each page at both widths go to /tmp/screens/ (outside the repository).
"""

from __future__ import annotations

import re

import pytest
from browser_fixtures import ARTIFACTS, browser  # noqa: F401 - fixture
from django.core.files.uploadedfile import SimpleUploadedFile
from playwright.sync_api import expect
from served_models import two_served_models, up_trunk
from web_fixtures import TINY_MODEL_ID

from webapp.datasets.services import create_dataset
from webapp.playground.models import Generation
from webapp.training.models import Job, MetricPoint

pytestmark = pytest.mark.django_db(transaction=True)

SCREENS = ARTIFACTS / "screens"  # each main page at each width, for a person to look at
WIDTHS = (390, 1280)
PASSWORD = "layout-password-123"
NAV_LINKS = ["Jobs", "Datasets", "Playground", "Fleet", "Admin", "Log out"]
LONG_JOB_NAME = "rank sweep: lr 2e-4, r=16, trunk LoRA on, dropout 0.05"
ROWS = "".join(f'{{"prompt": "Q: what is {i} plus {i}?\\nA:", "completion": " {2 * i}"}}\n' for i in range(12))


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_user("ada", password=PASSWORD, is_staff=True, is_superuser=True)


@pytest.fixture
def screen(browser, web_server, staff):  # noqa: F811 - the fixture of browser_fixtures
    """A logged-in page whose viewport width a test sets."""
    context = browser.new_context(base_url=web_server.url, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto("/accounts/login/")
    page.fill("input[name=username]", staff.username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    expect(page).to_have_url("/jobs/")
    yield page
    context.close()


def make_job(owner, losses: list[float], name: str = "", val: float | None = None) -> Job:
    job = Job.objects.create(owner=owner, name=name, dataset_name="sums", base_model=TINY_MODEL_ID,
                             max_steps=len(losses), status=Job.Status.SUCCEEDED, current_step=len(losses),
                             total_steps=len(losses), last_loss=losses[-1], last_val_loss=val)
    for step, loss in enumerate(losses, start=1):
        MetricPoint.objects.create(job=job, step=step, kind="train", loss=loss, lr=2e-4)
    if val is not None:
        MetricPoint.objects.create(job=job, step=len(losses), kind="eval", val_loss=val)
    return job


def overflow(page) -> dict:
    return page.evaluate("() => ({scroll: document.documentElement.scrollWidth, inner: window.innerWidth})")


def check_fits_and_nav(page, where: str) -> None:
    """No horizontal scroll, and every link of the bar visible inside the window."""
    sizes = overflow(page)
    assert sizes["scroll"] <= sizes["inner"], f"{where} scrolls sideways: {sizes}"
    for name in NAV_LINKS:
        link = page.locator("header.topbar").get_by_role("button" if name == "Log out" else "link", name=name,
                                                          exact=True)
        expect(link).to_be_visible()
        box = link.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= sizes["inner"], f"{where}: {name} is off screen {box}"


def test_main_pages_fit_at_390_and_1280_with_every_link_of_the_bar_on_screen(screen, staff):
    dataset = create_dataset(staff, SimpleUploadedFile("sums.jsonl", ROWS.encode()), name="sums")
    first = make_job(staff, [3.0, 2.4, 2.0], name=LONG_JOB_NAME, val=2.2)
    second = make_job(staff, [3.1, 2.8, 2.5])
    up_trunk()
    base = Generation.objects.create(owner=staff, base_model=TINY_MODEL_ID, prompt="hello", status="succeeded",
                                     output="hi", token_count=1)
    adapted = Generation.objects.create(owner=staff, job=first, base_model=TINY_MODEL_ID, prompt="hello",
                                        paired_with=base, status="succeeded", token_count=40,
                                        output="\n".join(f"a longer answer, line {i}" for i in range(12)))
    pages = {
        "jobs": "/jobs/", "job": f"/jobs/{first.pk}/", "job-form": "/jobs/new/", "datasets": "/datasets/",
        "dataset": f"/datasets/{dataset.pk}/", "playground": f"/playground/?ids={base.pk},{adapted.pk}",
        "fleet": "/fleet/", "compare": f"/jobs/compare/?ids={first.pk}&ids={second.pk}",
    }
    charted = {"job": "#loss-chart .uplot", "compare": "#compare-chart .uplot"}
    SCREENS.mkdir(parents=True, exist_ok=True)
    for width in WIDTHS:
        screen.set_viewport_size({"width": width, "height": 900})
        for name, path in pages.items():
            screen.goto(path)
            if name in charted:
                expect(screen.locator(charted[name])).to_be_visible()
            check_fits_and_nav(screen, f"{name} at {width} px")
            screen.screenshot(path=str(SCREENS / f"{name}-{width}.png"), full_page=True)

    # The dataset page: a card's heading starts at its padding; the SHA-256 row keeps apart from the buttons.
    screen.goto(pages["dataset"])
    gaps = screen.evaluate("""() => Array.from(document.querySelectorAll('.card > h2:first-child')).map((h) => {
        const card = h.parentElement, style = getComputedStyle(card);
        return h.getBoundingClientRect().top - card.getBoundingClientRect().top
               - parseFloat(style.borderTopWidth) - parseFloat(style.paddingTop); })""")
    assert gaps and all(abs(gap) < 1 for gap in gaps), f"space above the cards' headings: {gaps}"
    gap = screen.evaluate("""() => { const facts = document.querySelector('.card dl.facts');
        return facts.nextElementSibling.getBoundingClientRect().top - facts.getBoundingClientRect().bottom; }""")
    assert gap >= 8, f"the buttons are {gap} px below the SHA-256 row"

    # The playground at 1280 px: the answers side by side, equally tall; the job's whole name fits its select.
    screen.goto(pages["playground"])
    boxes = [screen.locator(f".panel[data-generation='{g.pk}']").bounding_box() for g in (base, adapted)]
    assert boxes[0]["y"] == boxes[1]["y"] and boxes[0]["x"] < boxes[1]["x"], boxes
    assert abs(boxes[0]["height"] - boxes[1]["height"]) < 1, boxes
    outputs = [screen.locator(f".panel[data-generation='{g.pk}'] [data-role=output]").bounding_box()
               for g in (base, adapted)]
    assert abs(outputs[0]["y"] + outputs[0]["height"] - outputs[1]["y"] - outputs[1]["height"]) < 1, outputs
    screen.select_option("#id_job", str(first.pk))
    room = screen.evaluate("""() => { const select = document.getElementById('id_job'), style = getComputedStyle(select);
        const context = document.createElement('canvas').getContext('2d');
        context.font = style.font;
        const text = context.measureText(select.selectedOptions[0].text).width;
        return select.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight) - 24 - text; }""")
    assert room > 0, f"the select cuts the job's name ({room:.0f} px short)"


def test_a_short_jobs_chart_labels_whole_steps_and_its_legend_shows_the_latest_values(screen, staff):
    job = make_job(staff, [3.0, 2.5, 2.0], val=2.2)
    screen.goto(f"/jobs/{job.pk}/")
    legend = screen.locator("#loss-chart .u-legend .u-series")
    expect(legend.first.locator(".u-value")).to_have_text("3")  # the step, before any hover
    assert screen.evaluate("() => window.jobLive.chart.data[0]") == [1, 2, 3]
    ticks = screen.evaluate("() => window.jobLive.chart.axes[0]._values")
    assert ticks and all(re.fullmatch(r"\d+", tick) for tick in ticks), f"step ticks: {ticks}"
    values = dict(zip((label.strip() for label in legend.locator("th").all_text_contents()),
                      legend.locator(".u-value").all_inner_texts()))
    assert values["train loss"] == "2.0000" and values["validation loss"] == "2.2000", values
    assert values["learning rate"] == "2.00e-4", values
    assert "--" not in values.values(), values

    # Hovering shows the hovered step; leaving shows the latest again.
    over = screen.locator("#loss-chart .u-over")
    box = over.bounding_box()
    over.hover(position={"x": 2, "y": box["height"] / 2})
    expect(legend.first.locator(".u-value")).to_have_text("1")
    screen.mouse.move(box["x"] + box["width"] / 2, box["y"] - 200)
    expect(legend.first.locator(".u-value")).to_have_text("3")


def test_the_compare_page_lists_the_runs_in_one_order(screen, staff):
    first = make_job(staff, [3.0, 2.5, 2.0], name="first run")
    second = make_job(staff, [3.1, 2.9, 2.7], name="second run")
    screen.goto(f"/jobs/compare/?ids={second.pk}&ids={first.pk}")
    order = [f"#{first.pk}", f"#{second.pk}"]
    expect(screen.locator(".jobs-to-compare small.muted")).to_have_text(order)
    expect(screen.locator("table.compare thead small.muted")).to_have_text(order)
    legend = screen.locator("#compare-chart .u-legend small.muted")
    expect(legend).to_have_text([order[0], order[0], order[1], order[1]])  # train and val of each
    ticks = screen.evaluate("() => window.compareChart.axes[0]._values")
    assert ticks and all(re.fullmatch(r"\d+", tick) for tick in ticks), f"step ticks: {ticks}"
    steps = screen.locator("#compare-chart .u-legend .u-series").first.locator(".u-value")
    expect(steps).to_have_text("3")
    # The legend's entries line up in columns, from the left edge of the chart.
    lefts = screen.evaluate("""() => Array.from(document.querySelectorAll('#compare-chart .u-legend .u-series'))
        .map((row) => Math.round(row.getBoundingClientRect().left - row.closest('.uplot').getBoundingClientRect().left))""")
    assert lefts[0] <= 8 and len(set(lefts)) < len(lefts), f"legend entries' left edges: {lefts}"


def test_the_base_model_follows_the_chosen_job(screen, staff, web_dirs):
    with two_served_models(web_dirs["models"]) as (job_model, other_model):
        job = Job.objects.create(owner=staff, name="sums run", dataset_name="sums", base_model=job_model,
                                 status=Job.Status.SUCCEEDED)
        screen.goto("/playground/")
        model = screen.locator("#id_base_model")
        expect(model).to_be_enabled()
        model.select_option(other_model)
        screen.select_option("#id_job", str(job.pk))
        expect(model).to_be_disabled()
        expect(model).to_have_value(job_model)
        screen.select_option("#id_job", "")
        expect(model).to_be_enabled()
        expect(model).to_have_value(other_model)  # the choice made before
