"""Compare runs: the user's chosen jobs on one chart with their settings side by side."""

from __future__ import annotations

import json
import re

import pytest
from browser_fixtures import ARTIFACTS, browser, log_in, page  # noqa: F401 - fixtures
from playwright.sync_api import expect

from webapp.training.models import Job, MetricPoint

pytestmark = pytest.mark.django_db


def make_job(owner, name, lr, losses, val=None, job_name="", status=Job.Status.SUCCEEDED):
    job = Job.objects.create(owner=owner, name=job_name, dataset_name=name, base_model="tiny-llama",
                             max_steps=len(losses) or 10, learning_rate=lr, status=status,
                             current_step=len(losses), total_steps=len(losses) or 10,
                             last_loss=losses[-1] if losses else None)
    for step, loss in enumerate(losses, start=1):
        MetricPoint.objects.create(job=job, step=step, kind="train", loss=loss)
    if val is not None:
        MetricPoint.objects.create(job=job, step=len(losses), kind="eval", val_loss=val)
    return job


def embedded_series(html: str) -> list[dict]:
    match = re.search(r'<script id="compare-series" type="application/json">(.*?)</script>', html, re.S)
    return json.loads(match.group(1)) if match else []


def compact(html: str) -> str:
    """The page without the whitespace between tags."""
    return re.sub(r">\s+<", "><", html)


def setting_rows(html: str) -> dict[str, tuple[bool, list[str]]]:
    """Each settings row of the comparison table: label -> (highlighted as differing, the values)."""
    rows = {}
    for classes, cells in re.findall(r'<tr class="(setting[^"]*)">(.*?)</tr>', compact(html), re.S):
        label, *values = re.findall(r"<td>(.*?)</td>", cells)
        rows[label] = ("differs" in classes.split(), values)
    return rows


def test_compare_overlays_the_chosen_jobs(client, django_user_model):
    owner = django_user_model.objects.create_user("owner", password="owner-pass-123")
    first = make_job(owner, "alpha", 1e-3, [3.0, 2.5, 2.0], val=2.2)
    second = make_job(owner, "beta", 5e-4, [3.1, 2.9])
    client.force_login(owner)
    html = client.get(f"/jobs/compare/?ids={first.pk}&ids={second.pk}").content.decode()
    series = embedded_series(html)
    assert [s["id"] for s in series] == [first.pk, second.pk]
    assert series[0]["train"] == [[1, 3.0], [2, 2.5], [3, 2.0]] and series[0]["val"] == [[3, 2.2]]
    assert series[1]["train"] == [[1, 3.1], [2, 2.9]] and series[1]["val"] == []
    assert setting_rows(html)["Learning rate"] == (True, ["1e-03", "5e-04"])
    assert "vendor/uplot-1.6.32/uPlot.iife.min.js" in html


def test_compare_ignores_other_users_jobs_and_escapes_names(client, django_user_model):
    owner = django_user_model.objects.create_user("owner", password="owner-pass-123")
    other = django_user_model.objects.create_user("other", password="other-pass-123")
    mine = make_job(owner, "<script>alert(1)</script>", 1e-3, [1.0])
    theirs = make_job(other, "secret-run", 1e-3, [9.0])
    client.force_login(owner)
    html = client.get(f"/jobs/compare/?ids={mine.pk}&ids={theirs.pk}").content.decode()
    assert [s["id"] for s in embedded_series(html)] == [mine.pk]
    assert "secret-run" not in html and "<script>alert(1)</script>" not in html
    client.logout()
    assert client.get(f"/jobs/compare/?ids={mine.pk}").status_code == 302


def test_compare_labels_jobs_by_name_with_their_id(client, django_user_model):
    owner = django_user_model.objects.create_user("owner", password="owner-pass-123")
    named = make_job(owner, "chats.jsonl", 1e-3, [3.0, 2.0], job_name="rank sweep, r=8")
    unnamed = make_job(owner, "notes.jsonl", 1e-3, [3.0, 2.4])  # from before jobs had names
    client.force_login(owner)
    html = compact(client.get(f"/jobs/compare/?ids={named.pk}&ids={unnamed.pk}").content.decode())
    assert [s["name"] for s in embedded_series(html)] == ["rank sweep, r=8", "notes.jsonl"]  # the legend
    for job, label in ((named, "rank sweep, r=8"), (unnamed, "notes.jsonl")):
        muted_id = f'<small class="muted">#{job.pk}</small>'
        assert f'<th><a href="/jobs/{job.pk}/">{label}</a>{muted_id}</th>' in html  # table header
        assert re.search(rf'value="{job.pk}" checked>\s*{re.escape(label)}\s*{re.escape(muted_id)}', html)  # checkbox
    assert "#{} chats.jsonl".format(named.pk) not in html


def test_jobs_without_metrics_are_not_offered_and_left_out_with_a_note(client, django_user_model):
    owner = django_user_model.objects.create_user("owner", password="owner-pass-123")
    trained = make_job(owner, "alpha", 1e-3, [3.0, 2.0])
    cancelled = make_job(owner, "beta", 1e-3, [], job_name="stopped early", status=Job.Status.CANCELLED)
    client.force_login(owner)
    html = compact(client.get(f"/jobs/compare/?ids={trained.pk}&ids={cancelled.pk}").content.decode())
    assert f'name="ids" value="{trained.pk}"' in html and f'name="ids" value="{cancelled.pk}"' not in html
    assert [s["id"] for s in embedded_series(html)] == [trained.pk]
    assert f'<a href="/jobs/{cancelled.pk}/">' not in html, "no column for it in the table"
    note = re.search(r'<p class="muted" id="left-out">(.*?)</p>', html, re.S).group(1)
    assert "no loss recorded yet" in note and f"stopped early <small>#{cancelled.pk}</small>" in note
    assert "cancelled" in note
    html = compact(client.get(f"/jobs/compare/?ids={trained.pk}").content.decode())
    assert 'id="left-out"' not in html


def test_settings_have_labels_and_the_rows_that_differ_are_marked(client, django_user_model):
    owner = django_user_model.objects.create_user("owner", password="owner-pass-123")
    first = make_job(owner, "alpha", 2e-4, [3.0, 2.0])
    second = make_job(owner, "alpha", 2e-4, [3.0, 2.1])
    Job.objects.filter(pk=second.pk).update(lora_r=16, train_trunk_lora=False)
    client.force_login(owner)
    html = client.get(f"/jobs/compare/?ids={first.pk}&ids={second.pk}").content.decode()
    rows = setting_rows(html)
    assert rows["LoRA rank r"] == (True, ["8", "16"])
    assert rows["Train LoRA on the trunk too"] == (True, ["yes", "no"])
    assert rows["Learning rate"] == (False, ["2e-04", "2e-04"])
    assert rows["Dataset"] == (False, ["alpha", "alpha"])
    assert rows["Blocks kept before the trunk"] == (False, ["–", "–"])
    assert [label for label in rows if rows[label][0]] == ["LoRA rank r", "Train LoRA on the trunk too"]
    assert not [label for label in rows if "_" in label], "no snake_case names on the page"
    assert 'id="only-differing"' in html and "Show only the settings that differ" in html


@pytest.mark.django_db(transaction=True)
def test_in_a_browser_the_switch_hides_the_settings_that_agree(page, django_user_model):
    log_in(page, django_user_model)
    user = django_user_model.objects.get(username="ada")
    first = make_job(user, "alpha", 2e-4, [3.0, 2.0], job_name="rank sweep")
    second = make_job(user, "alpha", 5e-4, [3.0, 2.1])
    page.goto(f"/jobs/compare/?ids={first.pk}&ids={second.pk}")
    legend = page.locator(".u-legend")
    expect(legend).to_contain_text("rank sweep")
    expect(legend.locator("small.muted").first).to_have_text(f"#{first.pk}")
    settings = page.locator("table.compare tr.setting")
    total = settings.count()
    assert total > 10
    expect(page.locator("table.compare tr.setting:visible")).to_have_count(total)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "compare.png"), full_page=True)
    page.check("#only-differing")
    expect(page.locator("table.compare tr.setting:visible")).to_have_count(1)
    expect(page.locator("table.compare tr.setting:visible td").first).to_have_text("Learning rate")
    expect(page.locator("table.compare tr:not(.setting):visible")).to_have_count(4)  # header, status, losses
    page.uncheck("#only-differing")
    expect(page.locator("table.compare tr.setting:visible")).to_have_count(total)
