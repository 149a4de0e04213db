"""The job's privacy settings, end to end: the form and the API, the worker, the trunk server."""

from __future__ import annotations

import io
import zipfile

import pytest
from rest_framework.test import APIClient
from web_fixtures import TINY_MODEL_ID, wait_for_job
from web_jobs import JOB, upload

from splitcore.privacy import PrivacySettings
from splitcore.privacy.measured import MAX_RECOMMENDED_COST, measured_meta, measured_points, recommended_point
from webapp.training.forms import JobForm
from webapp.training.models import Job, JobLog
from webapp.trunks.models import TrunkServer

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def api(owner):
    client = APIClient()
    client.force_authenticate(owner)
    return client


def adapter_layers(client, job: Job) -> set[int]:
    response = client.get(f"/jobs/{job.pk}/adapter/")
    bundle = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))
    from safetensors.torch import load

    weights = load(bundle.read("adapter_model.safetensors"))
    return {int(key.split(".layers.")[1].split(".")[0]) for key in weights}


def test_the_form_privacy_choices_reach_the_job_the_worker_and_the_trunk(client, owner, api, registered_trunk,
                                                                          celery_worker, web_trunk):
    client.force_login(owner)
    dataset_id = upload(api)
    page = client.get("/jobs/new/").content.decode()
    assert "<legend>Privacy</legend>" in page and 'name="bottom_layers"' in page and 'name="grad_noise"' in page

    response = client.post("/jobs/new/", {**JOB, "dataset": dataset_id, "train_trunk_lora": "on", "seed": 0,
                                          "warmup_steps": 0, "bottom_layers": 1, "top_layers": 1,
                                          "hidden_noise": 0.25, "grad_noise": 0.5})
    assert response.status_code == 302, response.content.decode()[-3000:]
    job = Job.objects.get(owner=owner)
    assert (job.bottom_layers, job.top_layers, job.hidden_noise, job.grad_noise) == (1, 1, 0.25, 0.5)

    job = wait_for_job(job.pk, worker=celery_worker)
    assert job.status == "succeeded", job.error_message
    logs = list(JobLog.objects.filter(job=job).values_list("message", flat=True))
    assert ("cut: 1 blocks here, the trunk runs layers 1-4, 1 blocks here after it; hidden-state noise 0.25, "
            "gradient noise 0.5") in logs
    # The trunk opened this job's session on exactly that range.
    assert f"layers 1-4, trunk LoRA on) for 'job {job.pk}'" in web_trunk.log_path.read_text()
    # Its LoRA covers the trunk's range, the client's covers the rest: one adapter for all six blocks.
    assert adapter_layers(client, job) == {0, 1, 2, 3, 4, 5}

    detail = api.get(f"/api/jobs/{job.pk}/").json()
    assert (detail["bottom_layers"], detail["top_layers"], detail["hidden_noise"], detail["grad_noise"]) == \
        (1, 1, 0.25, 0.5)

    # The worker's leakage audit, at this job's cut and noise, stored and shown.
    audit = detail["privacy_audit"]["first_step"]
    assert audit["cut"] == {"n_bottom": 1, "n_top": 1}
    assert audit["settings"]["hidden_noise"] == 0.25 and audit["settings"]["grad_noise"] == 0.5
    assert {r["name"] for r in audit["results"]} == {"learned_inversion", "aligned_inversion", "exact_search",
                                                     "gradient_labels", "gradient_search"}
    assert all(0 < r["total"] and 0 <= r["recovered"] <= r["total"] for r in audit["results"])
    assert "last_step" not in detail["privacy_audit"], "the Bottom is re-audited only when NoPeek trained it"
    worst = max(r["rate"] for r in audit["results"])
    headline = f"could read about {worst:.0%} of your tokens" if worst >= 0.01 else "could read about"
    assert any(headline in line for line in logs if line.startswith("privacy audit (before training"))
    page = client.get(f"/jobs/{job.pk}/").content.decode()
    assert 'id="privacy-panel"' in page and headline in page and 'data-attack="exact_search"' in page
    response = client.get(f"/jobs/{job.pk}/adapter/")
    bundle = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))
    card = bundle.read("README.md").decode()
    assert "## Privacy" in card and headline in card and "hidden-state noise 0.25" in card


def test_the_api_takes_privacy_settings_and_defaults_to_the_trunks_cut(api, registered_trunk):
    dataset_id = upload(api)
    created = api.post("/api/jobs/", {**JOB, "dataset": dataset_id, "bottom_layers": 3, "grad_noise": 1.5},
                       format="json")
    assert created.status_code == 201, created.content
    job = Job.objects.get(pk=created.json()["id"])
    assert (job.bottom_layers, job.top_layers, job.hidden_noise, job.grad_noise) == (3, None, 0.0, 1.5)
    assert job.train_config().privacy.bottom_layers == 3
    closed = api.post("/api/jobs/", {**JOB, "dataset": dataset_id, "gradients_to_trunk": False,
                                     "train_trunk_lora": False, "private_bottom": 0.5}, format="json")
    assert closed.status_code == 201, closed.content
    assert closed.json()["gradients_to_trunk"] is False and closed.json()["private_bottom"] == 0.5


@pytest.mark.parametrize("given,field,message", [
    ({"bottom_layers": 4, "top_layers": 2}, "bottom_layers", "leaves no layer for the Trunk"),
    ({"bottom_layers": 0}, "bottom_layers", "greater than or equal to 1"),
    ({"hidden_noise": -0.5}, "hidden_noise", "greater than or equal to 0"),
    ({"grad_noise": "lots"}, "grad_noise", "Enter a number"),
    ({"gradients_to_trunk": False, "train_trunk_lora": True}, "non_field_errors", "its LoRA cannot learn"),
    ({"gradients_to_trunk": False, "train_trunk_lora": False, "nopeek": 1}, "non_field_errors",
     "nothing to act on"),
])
def test_impossible_privacy_settings_are_refused_with_the_field_and_the_reason(api, registered_trunk, given,
                                                                              field, message):
    dataset_id = upload(api)
    response = api.post("/api/jobs/", {**JOB, "dataset": dataset_id, **given}, format="json")
    assert response.status_code == 400
    assert message in " ".join(response.json()[field]), response.json()
    assert not Job.objects.exists()


def test_a_cut_the_trunk_does_not_allow_is_refused_before_the_job_starts(api, registered_trunk, redis_server):
    narrow = TrunkServer.objects.create(
        name="narrow", address="127.0.0.1:9", token="x" * 24, status=TrunkServer.Status.UP, model_id=TINY_MODEL_ID,
        num_layers=6, trunk_start=2, trunk_end=4, min_trunk_start=2, max_trunk_end=4, max_sessions=4,
        active_sessions=0)
    dataset_id = upload(api)
    response = api.post("/api/jobs/", {**JOB, "dataset": dataset_id, "trunk": narrow.pk, "bottom_layers": 1},
                        format="json")
    assert response.status_code == 400
    assert response.json()["bottom_layers"] == [
        "narrow does not allow this cut: it keeps 2 or more blocks before the trunk and 2 or more after it on "
        "the data owner's machine"]
    # Auto: the registered trunk allows 1 block before it, so the job is taken.
    assert api.post("/api/jobs/", {**JOB, "dataset": dataset_id, "bottom_layers": 1}, format="json").status_code \
        == 201
    registered_trunk.delete()
    refused = api.post("/api/jobs/", {**JOB, "dataset": dataset_id, "bottom_layers": 1}, format="json")
    assert refused.status_code == 400
    assert "no healthy trunk for 'tiny-llama' allows keeping 1 blocks before the trunk" in \
        refused.json()["bottom_layers"][0].replace(TINY_MODEL_ID, "tiny-llama")


def test_the_form_shows_the_measured_tradeoff_and_starts_at_the_best_measured_compromise(client, owner, api,
                                                                                         registered_trunk, settings):
    points = measured_points()
    ceiling = settings.PRIVACY_MAX_CLIENT_SHARE
    point = recommended_point(max_client_share=ceiling)
    assert points and point is not None, "the measured trade-off ships with the code"
    assert point.val_loss_change <= MAX_RECOMMENDED_COST and point.client_share <= ceiling
    # Compared with the rows the same audit measured (the stronger one, when some rows have it).
    comparable = [p for p in points if p.strong_audit == point.strong_audit]
    assert all(p.worst_rate >= point.worst_rate for p in comparable
               if p.val_loss_change <= MAX_RECOMMENDED_COST and p.client_share <= ceiling)
    client.force_login(owner)
    page = client.get("/jobs/new/").content.decode()
    assert 'id="privacy-table"' in page and 'id="privacy-points"' in page
    assert page.count("<tr data-point=") == len(points)

    # The measured model's form starts at the recommended setting, and says so.
    measured_model = measured_meta()["model"]
    form = JobForm(user=owner, base_model=measured_model)
    assert form.recommended == point
    assert {name: form.fields[name].initial for name in form.fields if name in point.privacy.to_dict()} == \
        {name: value for name, value in point.privacy.to_dict().items() if name in form.fields}
    # Another model (this test's tiny one, of 6 layers) starts at its trunk's default cut, undefended.
    tiny = JobForm(user=owner, base_model=TINY_MODEL_ID)
    assert tiny.recommended is None
    assert tiny.fields["bottom_layers"].initial is None and tiny.fields["private_bottom"].initial == 0.0
    assert 'id="privacy-default"' not in page  # the page's initial model is the tiny one

    dataset_id = upload(api)
    created = api.post("/api/jobs/", {**JOB, "dataset": dataset_id}, format="json")
    assert created.status_code == 201, created.content
    assert Job.objects.get(pk=created.json()["id"]).privacy_settings() == PrivacySettings()
