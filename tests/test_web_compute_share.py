"""The compute each side of a job's cut pays, wherever a cut is chosen or shown: the job form (with the measured
table and the recommendation under the site's ceiling on the workers' share), the job page and the API.

Trunks are records as their checks would fill them in; the base models are config.json files in a models
directory of the test's own (all the count needs).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil

import pytest
from conftest import PROJECT_ROOT
from django.urls import reverse
from django.utils.html import escape
from rest_framework.test import APIClient
from web_fixtures import TINY_MODEL_ID

from splitcore.model.compute_share import compute_share
from splitcore.model.default_model import DEFAULT_MODEL_NAME
from splitcore.privacy import measured
from webapp.training.models import Job, JobLink
from webapp.trunks.models import TrunkServer

pytestmark = pytest.mark.django_db

DEFAULT_CONFIG = json.loads((PROJECT_ROOT / "benchmarks" / "default_model_config.json").read_text())


@pytest.fixture
def models_dir(tmp_path, settings, web_dirs):
    """The tiny llama's config (6 blocks) and the default model's (30 blocks), installed for this test only."""
    root = tmp_path / "models"
    (root / TINY_MODEL_ID).mkdir(parents=True)
    shutil.copy(web_dirs["models"] / TINY_MODEL_ID / "config.json", root / TINY_MODEL_ID / "config.json")
    (root / DEFAULT_MODEL_NAME).mkdir()
    (root / DEFAULT_MODEL_NAME / "config.json").write_text(json.dumps(DEFAULT_CONFIG))
    settings.MODELS_DIR = root
    return root


def tiny_config(models_dir) -> dict:
    return json.loads((models_dir / TINY_MODEL_ID / "config.json").read_text())


def serving(name: str, model_id: str = TINY_MODEL_ID, num_layers: int = 6, default: tuple[int, int] = (2, 2),
            **fields) -> TrunkServer:
    """A trunk whose last check found it up, by default leaving ``default`` blocks before and after it, and
    allowing any cut that leaves one block on either side."""
    return TrunkServer.objects.create(
        name=name, address=f"{name}.example:50051", token="t" * 24, status=TrunkServer.Status.UP, model_id=model_id,
        model_type="llama", num_layers=num_layers, trunk_start=default[0], trunk_end=num_layers - default[1],
        min_trunk_start=1, max_trunk_end=num_layers - 1, max_sessions=4, active_sessions=0, **fields)


def compute_line(page: str) -> str:
    return re.search(r'<p id="compute-share" aria-live="polite"( hidden)?>(.*?)</p>', page, re.S).group(2)


def new_job_page(client, owner, **posted) -> str:
    client.force_login(owner)
    response = client.post(reverse("training:job-new"), posted) if posted else client.get(reverse("training:job-new"))
    return response.content.decode()


# ------------------------------------------------------------------ the job form


def test_the_form_says_what_share_of_each_step_the_cut_leaves_on_the_workers(client, owner, models_dir):
    trunk = serving("a")
    config = tiny_config(models_dir)
    default = compute_share(config, 2, 2)
    assert compute_line(new_job_page(client, owner)) == escape(
        f"At the trunk's default cut, 2 blocks before it and 2 after it, {default.describe()}.")
    assert default.describe().startswith("your workers run 4 of 6 blocks and the LM head (")

    chosen = compute_share(config, 1, 1)
    page = new_job_page(client, owner, base_model=TINY_MODEL_ID, bottom_layers=1, top_layers=1)
    assert compute_line(page) == escape(f"At this cut {chosen.describe()}.")
    one_side = compute_share(config, 1, 2)
    assert compute_line(new_job_page(client, owner, base_model=TINY_MODEL_ID, bottom_layers=1)) == escape(
        f"With the trunk's default of 2 blocks after it, {one_side.describe()}.")
    assert compute_line(new_job_page(client, owner, base_model=TINY_MODEL_ID, bottom_layers=3, top_layers=3)) == (
        f"{TINY_MODEL_ID} has 6 blocks: keep at least 1 before the trunk and 1 after it, and at most 5 in all, so "
        "the trunk runs at least one.")

    # The page script gets the same figures: the work of each block and of the LM head, the default cuts.
    data = json.loads(re.search(r'<script id="job-compute-data" type="application/json">(.*?)</script>', page,
                                re.S).group(1))
    model = data["models"][TINY_MODEL_ID]
    assert len(model["block_macs"]) == 6 and model["default_cut"] == [2, 2]
    share = (sum(model["block_macs"][:1]) + sum(model["block_macs"][-1:]) + model["head_macs"]) / (
        sum(model["block_macs"]) + model["head_macs"])
    assert share == pytest.approx(chosen.client_share)
    assert data["trunks"] == {str(trunk.pk): {"model": TINY_MODEL_ID, "default_cut": [2, 2]}}


def test_trunks_with_different_defaults_leave_the_default_cut_to_the_trunk_the_job_gets(client, owner, models_dir):
    serving("two-two")
    shallow = serving("one-one", default=(1, 1))
    assert compute_line(new_job_page(client, owner)).startswith(
        "Empty cut fields take the default of the trunk the job gets, which is not known here")
    page = new_job_page(client, owner, base_model=TINY_MODEL_ID, trunk=shallow.pk)
    assert compute_line(page) == escape("At the trunk's default cut, 1 blocks before it and 1 after it, "
                                        f"{compute_share(tiny_config(models_dir), 1, 1).describe()}.")


def test_a_model_without_its_config_here_shows_no_line(client, owner, models_dir):
    serving("a")
    shutil.rmtree(models_dir / TINY_MODEL_ID)
    (models_dir / TINY_MODEL_ID).mkdir()
    (models_dir / TINY_MODEL_ID / "config.json").write_text('{"model_type": "bert"}')
    page = new_job_page(client, owner)
    assert re.search(r'<p id="compute-share" aria-live="polite" hidden></p>', page)


def measured_model_page(client, owner, settings) -> str:
    settings.DEFAULT_BASE_MODEL = DEFAULT_MODEL_NAME
    serving("default-model", model_id=DEFAULT_MODEL_NAME, num_layers=30)
    return new_job_page(client, owner)


def cut_line(point) -> str:
    """The form's compute line when the fields hold ``point``'s cut."""
    share = compute_share(DEFAULT_CONFIG, point.n_bottom, point.n_top)
    if point.privacy.bottom_layers is None and point.privacy.top_layers is None:
        return escape(f"At the trunk's default cut, 2 blocks before it and 2 after it, {share.describe()}.")
    return escape(f"At this cut {share.describe()}.")


def test_the_recommendation_stays_under_the_site_s_ceiling_and_says_what_the_ceiling_ruled_out(
        client, owner, models_dir, settings):
    settings.PRIVACY_MAX_CLIENT_SHARE = 0.35
    page = measured_model_page(client, owner, settings)
    points = measured.measured_points()
    rule = measured.recommendation(points, max_client_share=0.35)
    assert rule.chosen.client_share <= 0.35
    default = " ".join(re.search(r'<p id="privacy-default">(.*?)</p>', page, re.S).group(1).split())
    assert f"<strong>{escape(rule.chosen.name)}</strong>" in default
    assert ("cost at most 2% validation loss and run at most 35% of each step on your workers (this site's "
            "ceiling)") in default
    assert f"{rule.chosen.client_share:.0%} of each step on your workers" in default
    ceiling = re.search(r'<p id="privacy-ceiling">(.*?)</p>', page, re.S)
    if rule.excluded is None:
        assert ceiling is None
    else:
        assert ceiling.group(1) == escape(
            f"{rule.excluded.name} would read {rule.excluded.worst_rate:.0%} instead of {rule.chosen.worst_rate:.0%} "
            f"but runs {rule.excluded.client_share:.0%} of each step on your workers, above this site's 35% "
            "ceiling.")
    # The fields start at the recommended setting's cut, and the compute line says what runs where.
    assert compute_line(page) == cut_line(rule.chosen)

    # Every measured row says its share of the workers, an earlier audit's rows say so.
    table = re.search(r'<table class="audit-table">(.*?)</table>', page, re.S).group(1)
    assert "<th>Your workers' share</th>" in table
    deep = re.search(r'<tr data-point="\d+"><td>Bottom 8 \+ Top 16 blocks(.*?)</td><td class="nowrap">8 \+ 16</td>'
                     r'\s*<td>(.*?)</td>', table)
    assert deep.group(2) == "84%"
    deep_point = next(point for point in points if point.name == "Bottom 8 + Top 16 blocks")
    assert ("(earlier audit)" in deep.group(1)) is not deep_point.strong_audit


def test_a_ceiling_of_the_whole_step_keeps_the_rule_as_it_was(client, owner, models_dir, settings):
    settings.PRIVACY_MAX_CLIENT_SHARE = 1.0
    page = measured_model_page(client, owner, settings)
    chosen = measured.recommendation(measured.measured_points()).chosen
    default = re.search(r'<p id="privacy-default">(.*?)</p>', page, re.S).group(1)
    assert f"<strong>{escape(chosen.name)}</strong>" in default and "ceiling" not in default
    assert 'id="privacy-ceiling"' not in page
    assert compute_line(page) == cut_line(chosen)


def test_measured_step_times_are_shown_when_the_benchmark_recorded_them(client, owner, models_dir, settings,
                                                                        monkeypatch):
    recorded = json.loads(measured.MEASURED_PATH.read_text())
    for number, row in enumerate(recorded["rows"]):
        row["step_seconds"] = 1.5 + number / 100
    monkeypatch.setattr(measured, "_measured", lambda: recorded)
    table = re.search(r'<table class="audit-table">(.*?)</table>', measured_model_page(client, owner, settings),
                      re.S).group(1)
    assert "<th>Step time</th>" in table
    assert re.search(r"<td>undefended, default cut</td>.*?<td>1\.50 s</td></tr>", table, re.S)


def load_settings(monkeypatch, ceiling: str):
    """webapp/settings.py run afresh, beside the loaded settings, with PRIVACY_MAX_CLIENT_SHARE=``ceiling``."""
    monkeypatch.setenv("PRIVACY_MAX_CLIENT_SHARE", ceiling)
    spec = importlib.util.spec_from_file_location("webapp.settings_with_a_ceiling",
                                                  PROJECT_ROOT / "webapp" / "settings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("ceiling", "loaded"), [("0.5", 0.5), ("1", 1.0), ("", 0.35)])
def test_the_ceiling_setting_reads_a_share_of_a_step(monkeypatch, ceiling, loaded):
    assert load_settings(monkeypatch, ceiling).PRIVACY_MAX_CLIENT_SHARE == loaded


@pytest.mark.parametrize(("ceiling", "message"), [
    ("0", "PRIVACY_MAX_CLIENT_SHARE=0.0 must be a share of a step above 0 and at most 1 (e.g. 0.35)"),
    ("1.2", "PRIVACY_MAX_CLIENT_SHARE=1.2 must be a share of a step above 0 and at most 1"),
    ("nan", "PRIVACY_MAX_CLIENT_SHARE=nan must be a share of a step above 0 and at most 1"),
    ("many", "PRIVACY_MAX_CLIENT_SHARE='many' is not a number"),
])
def test_a_ceiling_setting_that_is_no_share_stops_the_start_with_its_name(monkeypatch, ceiling, message):
    with pytest.raises(Exception, match=re.escape(message)):
        load_settings(monkeypatch, ceiling)


# ------------------------------------------------------------------ the job page and the API


def job(owner, **fields) -> Job:
    return Job.objects.create(owner=owner, dataset_name="sums", name="a job", **{"base_model": TINY_MODEL_ID, **fields})


def test_the_job_page_and_the_api_show_the_split_of_compute_at_the_job_s_cut(client, owner, models_dir):
    config = tiny_config(models_dir)
    trunk = serving("a")
    chosen = job(owner, bottom_layers=1, top_layers=1)
    left_to_trunk = job(owner, trunk=trunk, bottom_layers=1)
    ran_on_links = job(owner, trunk=trunk)
    JobLink.objects.create(job=ran_on_links, position=0, trunk=trunk, trunk_name="a", first_block=1, last_block=2)
    JobLink.objects.create(job=ran_on_links, position=1, trunk=trunk, trunk_name="a", first_block=3, last_block=3)
    unknown_model = job(owner, bottom_layers=1, top_layers=1, base_model="not-installed")
    expected = {chosen: compute_share(config, 1, 1), left_to_trunk: compute_share(config, 1, 2),
                ran_on_links: compute_share(config, 1, 2), unknown_model: None}

    client.force_login(owner)
    api = APIClient()
    api.force_authenticate(owner)
    for each, share in expected.items():
        line = re.search(r'<p id="job-compute-share">Compute: (.*?)</p>',
                         client.get(f"/jobs/{each.pk}/").content.decode()).group(1)
        body = api.get(f"/api/jobs/{each.pk}/").json()
        if share is None:
            assert line == "Not known: the configuration of not-installed is not installed on this site."
            assert body["compute_share"] is None
            continue
        assert line == escape(share.describe()[:1].upper() + share.describe()[1:] + ".")
        assert body["compute_share"] == {"client_blocks": share.client_blocks, "trunk_blocks": share.trunk_blocks,
                                         "total_blocks": 6, "client_share": share.client_share,
                                         "description": share.describe()}
    listed = {entry["id"]: entry["compute_share"] for entry in api.get("/api/jobs/").json()["results"]}
    assert listed[chosen.pk]["client_blocks"] == 2 and listed[unknown_model.pk] is None


def test_a_queued_job_on_auto_knows_its_share_once_its_trunks_agree_on_the_default(client, owner, models_dir):
    queued = job(owner)  # no trunk yet, the cut left to the trunk's default
    api = APIClient()
    api.force_authenticate(owner)
    assert api.get(f"/api/jobs/{queued.pk}/").json()["compute_share"] is None
    client.force_login(owner)
    assert "Known once a trunk is chosen" in client.get(f"/jobs/{queued.pk}/").content.decode()
    serving("a")
    assert api.get(f"/api/jobs/{queued.pk}/").json()["compute_share"]["client_blocks"] == 4
