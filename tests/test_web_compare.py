"""Compare runs: the user's chosen jobs on one chart with their settings side by side."""

from __future__ import annotations

import json
import re

import pytest

from webapp.training.models import Job, MetricPoint

pytestmark = pytest.mark.django_db


def make_job(owner, name, lr, losses, val=None):
    job = Job.objects.create(owner=owner, dataset_name=name, base_model="tiny-llama", max_steps=len(losses),
                             learning_rate=lr, status=Job.Status.SUCCEEDED, current_step=len(losses),
                             total_steps=len(losses), last_loss=losses[-1])
    for step, loss in enumerate(losses, start=1):
        MetricPoint.objects.create(job=job, step=step, kind="train", loss=loss)
    if val is not None:
        MetricPoint.objects.create(job=job, step=len(losses), kind="eval", val_loss=val)
    return job


def embedded_series(html: str) -> list[dict]:
    match = re.search(r'<script id="compare-series" type="application/json">(.*?)</script>', html, re.S)
    return json.loads(match.group(1)) if match else []


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
    assert "<td>learning_rate</td><td>0.001</td><td>0.0005</td>" in html.replace("\n", "")
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
