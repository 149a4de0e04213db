"""The merged model of a finished job: built once by a real worker, streamed as a zip, its owner's only.

A tiny job trains through the session's trunk; its owner asks for the merged model (page or
API), a real Celery worker merges base + adapter and zips it, and the download loads with
plain transformers (no peft) with the logits of base + adapter. A failed build says why and
can be built again; a build whose worker died does not stay "building"; a job that has not
succeeded is refused.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from datetime import timedelta

import pytest
import torch
from django.conf import settings
from django.utils import timezone
from peft import PeftModel
from rest_framework.test import APIClient
from transformers import AutoModelForCausalLM, AutoTokenizer
from web_fixtures import TINY_MODEL_ID, wait_for_job
from web_jobs import exported_job

from webapp.byte_sizes import format_bytes
from webapp.training import merged
from webapp.training.models import Job, JobLog
from webapp.training.recovery import recover_jobs

pytestmark = pytest.mark.django_db(transaction=True)

ROWS = [{"prompt": f"Q: what is {i} plus {i}?\nA:", "completion": f" {2 * i}"} for i in range(24)]
JOB = {"base_model": TINY_MODEL_ID, "max_steps": 6, "batch_size": 2, "grad_accum_steps": 1, "max_seq_length": 32,
       "learning_rate": 0.02, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "val_fraction": 0.0}
MERGED_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "README.md", "training_args.json"}
BUILT = ("ready", "failed")


def api_for(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


def trained_job(api, worker) -> Job:
    """A tiny job trained through the trunk by the real worker, succeeded."""
    data = ("\n".join(json.dumps(row) for row in ROWS) + "\n").encode()
    upload = io.BytesIO(data)
    upload.name = "sums.jsonl"
    dataset = api.post("/api/datasets/", {"file": upload, "name": "sums"}, format="multipart")
    assert dataset.status_code == 201, dataset.content
    created = api.post("/api/jobs/", {**JOB, "dataset": dataset.json()["id"]}, format="json")
    assert created.status_code == 201, created.content
    job = wait_for_job(created.json()["id"], worker=worker)
    assert job.status == Job.Status.SUCCEEDED, job.error_message
    return job


def wait_for_merged(job: Job, worker) -> Job:
    return wait_for_job(job.pk, condition=lambda row: row.merged_status in BUILT, worker=worker)


def builds_of(job: Job) -> int:
    return JobLog.objects.filter(job=job, message="building the merged model").count()


def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("Q: what is 3 plus 3?\nA:", return_tensors="pt").input_ids
    with torch.no_grad():
        return model.eval()(ids).logits  # (1, seq, vocab)


def merged_section(page: str) -> str:
    return re.search(r'<section class="card" id="merged-model".*?</section>', page, re.S).group(0)


def test_a_finished_job_builds_its_merged_model_once_and_streams_it(client, owner, other, registered_trunk,
                                                                     celery_worker, tmp_path):
    api = api_for(owner)
    client.force_login(owner)
    job = trained_job(api, celery_worker)
    page = client.get(f"/jobs/{job.pk}/").content.decode()
    assert 'id="merged-form"' in merged_section(page) and 'id="merged-download"' not in page
    assert api.get(f"/api/jobs/{job.pk}/").json()["merged_status"] == "none"
    assert api.get(f"/api/jobs/{job.pk}/merged/").status_code == 409

    first = api.post(f"/api/jobs/{job.pk}/merged/")
    assert first.status_code == 202 and first.json()["merged_status"] == "building", first.content
    token = first.json()["merged_requested_at"]
    # Asked again before or after the worker finished: the same build either way, never a second one.
    second = client.post(f"/jobs/{job.pk}/merged/", follow=True)
    assert second.status_code == 200 and "already" in second.content.decode()
    job = wait_for_merged(job, celery_worker)
    assert job.merged_status == "ready", job.merged_error
    again = api.post(f"/api/jobs/{job.pk}/merged/")
    assert again.status_code == 200 and again.json()["merged_status"] == "ready"
    assert again.json()["merged_requested_at"] == token and builds_of(job) == 1

    size = job.merged_zip_path.stat().st_size
    assert job.merged_bytes == size
    page = client.get(f"/jobs/{job.pk}/").content.decode()
    section = merged_section(page)
    assert f'href="/jobs/{job.pk}/merged/"' in section and 'id="merged-form"' not in section
    assert f'<span id="merged-size" class="muted">{format_bytes(size)}</span>' in section
    assert 'http-equiv="refresh"' not in page

    response = client.get(f"/jobs/{job.pk}/merged/")
    assert response.status_code == 200 and response.streaming, "a file streamed from disk, never a built string"
    assert response["Content-Type"] == "application/zip" and int(response["Content-Length"]) == size
    assert f'filename="merged-model-job-{job.pk}.zip"' in response["Content-Disposition"]
    content = b"".join(response.streaming_content)
    assert len(content) == size
    bundle = zipfile.ZipFile(io.BytesIO(content))
    assert MERGED_FILES <= set(bundle.namelist()) and not any(n.startswith("adapter_") for n in bundle.namelist())
    assert {info.compress_type for info in bundle.infolist()} == {zipfile.ZIP_STORED}
    card = bundle.read("README.md").decode()
    assert f"{TINY_MODEL_ID} with its fine-tuned adapter merged in (job {job.pk})" in card
    assert "AutoModelForCausalLM.from_pretrained" in card and "license" in card and "## Privacy" in card
    assert json.loads(bundle.read("training_args.json"))["max_steps"] == 6
    bundle.extractall(tmp_path / "merged")

    model_dir = settings.MODELS_DIR / TINY_MODEL_ID
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not isinstance(plain, PeftModel)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), job.adapter_dir)
    expected, got = logits(adapted, tokenizer), logits(plain, tokenizer)
    assert (got - expected).abs().max().item() <= 1e-5
    assert (got - logits(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer)).abs().max().item() > 1e-3

    from_api = api.get(f"/api/jobs/{job.pk}/merged/")
    assert from_api.status_code == 200 and b"".join(from_api.streaming_content) == content
    described = api.get(f"/api/jobs/{job.pk}/").json()
    assert (described["merged_status"], described["merged_bytes"]) == ("ready", size)
    assert described["merged_url"] == f"/api/jobs/{job.pk}/merged/"

    outsider, outsider_api = client.__class__(), api_for(other)
    outsider.force_login(other)
    for method in ("get", "post"):
        assert getattr(outsider, method)(f"/jobs/{job.pk}/merged/").status_code == 404
        assert getattr(outsider_api, method)(f"/api/jobs/{job.pk}/merged/").status_code == 404
    assert outsider.get(f"/jobs/{job.pk}/").status_code == 404
    assert builds_of(job) == 1 and Job.objects.get(pk=job.pk).merged_requested_at.isoformat() == token


@pytest.mark.parametrize("status", ["queued", "running", "failed", "cancelled"])
def test_a_job_that_has_not_succeeded_is_refused_with_a_reason(client, owner, web_dirs, status):
    job = Job.objects.create(owner=owner, dataset_name="sums", base_model=TINY_MODEL_ID, max_steps=2, status=status)
    client.force_login(owner)
    api = api_for(owner)
    reason = f"job {job.pk} is {status}; only a succeeded job has a merged model"

    refused = api.post(f"/api/jobs/{job.pk}/merged/")
    assert refused.status_code == 409 and refused.json()["non_field_errors"][0].startswith(reason)
    download = api.get(f"/api/jobs/{job.pk}/merged/")
    assert download.status_code == 409 and download.json()["detail"].startswith(reason)
    page = client.post(f"/jobs/{job.pk}/merged/", follow=True)
    assert reason in page.content.decode()
    assert re.search(r'<section class="card" id="merged-model"[^>]* hidden>', page.content.decode()), \
        "the section waits, hidden, for the job to succeed"
    assert client.get(f"/jobs/{job.pk}/merged/").status_code == 404
    assert Job.objects.get(pk=job.pk).merged_status == "none" and not JobLog.objects.filter(job=job).exists()


def test_a_failed_build_says_why_and_can_be_built_again(client, owner, celery_worker):
    job = exported_job(owner, base_model="no-such-model")
    client.force_login(owner)
    assert client.post(f"/jobs/{job.pk}/merged/").status_code == 302
    job = wait_for_merged(job, celery_worker)
    assert job.merged_status == "failed"
    assert "the base model 'no-such-model' is not installed on this server" in job.merged_error
    section = merged_section(client.get(f"/jobs/{job.pk}/").content.decode())
    assert "The last build failed: the base model &#x27;no-such-model&#x27; is not installed" in section
    assert "Build it again" in section
    state = api_for(owner).get(f"/api/jobs/{job.pk}/merged/")
    assert state.status_code == 409 and state.json()["merged_status"] == "failed"
    assert "POST /api/jobs/" in state.json()["detail"] and "to try again" in state.json()["detail"]

    Job.objects.filter(pk=job.pk).update(base_model=TINY_MODEL_ID)  # the model is installed now
    retried = api_for(owner).post(f"/api/jobs/{job.pk}/merged/")
    assert retried.status_code == 202 and retried.json()["merged_error"] == ""
    job = wait_for_merged(job, celery_worker)
    assert job.merged_status == "ready" and job.merged_error == "" and builds_of(job) == 2
    assert zipfile.ZipFile(job.merged_zip_path).testzip() is None
    assert not list(job.directory.glob(f"{merged.STAGING_PREFIX}*")), "no staging directory is left"


def test_a_build_in_progress_is_shown_and_not_started_twice(client, owner, web_dirs, redis_server):
    job = exported_job(owner)
    requested = timezone.now() - timedelta(seconds=5)
    Job.objects.filter(pk=job.pk).update(merged_status="building", merged_requested_at=requested)
    client.force_login(owner)

    page = client.get(f"/jobs/{job.pk}/").content.decode()
    assert '<meta http-equiv="refresh" content="5">' in page, "the page reloads by itself while it builds"
    section = merged_section(page)
    assert "Building the merged model…" in section and "<form" not in section and "merged-download" not in section

    again = api_for(owner).post(f"/api/jobs/{job.pk}/merged/")
    assert again.status_code == 202 and again.json()["merged_status"] == "building"
    recover_jobs()  # a build within its time limit is left alone
    assert Job.objects.get(pk=job.pk).merged_status == "building"
    assert Job.objects.get(pk=job.pk).merged_requested_at == requested and not JobLog.objects.filter(job=job)


def test_a_build_whose_worker_died_does_not_stay_building(owner, celery_worker):
    long_ago = timezone.now() - timedelta(seconds=settings.MERGED_BUILD_TIMEOUT_S + settings.JOB_STALE_AFTER_S + 5)
    started, never_started = exported_job(owner), exported_job(owner)
    Job.objects.filter(pk=started.pk).update(merged_status="building", merged_requested_at=long_ago,
                                             merged_started_at=long_ago)
    Job.objects.filter(pk=never_started.pk).update(merged_status="building", merged_requested_at=long_ago)

    recover_jobs()  # what beat runs every JOB_SWEEP_S

    started, never_started = Job.objects.get(pk=started.pk), Job.objects.get(pk=never_started.pk)
    assert started.merged_status == never_started.merged_status == "failed"
    assert started.merged_error.startswith("no worker finished it within the time limit")
    assert never_started.merged_error.startswith("no worker started it")
    retried, began = merged.request_merged(started)
    assert began and retried.merged_status == "building" and retried.merged_requested_at > long_ago
    assert wait_for_merged(retried, celery_worker).merged_status == "ready"

    # A message that comes back after its worker died mid-build (it had started) fails the build at once.
    token = timezone.now() - timedelta(seconds=30)
    died = exported_job(owner)
    Job.objects.filter(pk=died.pk).update(merged_status="building", merged_requested_at=token,
                                          merged_started_at=token)
    assert merged.build(died.pk, token.isoformat()) == "failed"
    died = Job.objects.get(pk=died.pk)
    assert died.merged_status == "failed" and died.merged_error.startswith("the worker stopped while building it")
    # A message of an older request (superseded) does nothing.
    assert merged.build(retried.pk, long_ago.isoformat()) == "stale"
    assert Job.objects.get(pk=retried.pk).merged_status == "ready" and builds_of(retried) == 1


def test_a_built_merged_model_is_deleted_after_its_retention_and_built_again_on_request(client, owner,
                                                                                      celery_worker):
    jobs = [exported_job(owner) for _ in range(2)]
    for job in jobs:
        merged.request_merged(job)
    old, fresh = (wait_for_merged(job, celery_worker) for job in jobs)
    assert old.merged_status == fresh.merged_status == "ready"
    assert fresh.merged_expires_at == fresh.merged_built_at + timedelta(hours=settings.MERGED_RETENTION_HOURS)
    client.force_login(owner)
    section = merged_section(client.get(f"/jobs/{fresh.pk}/").content.decode())
    assert "keeps it for 3 days after the build" in section
    assert f"kept until {timezone.localtime(fresh.merged_expires_at):%Y-%m-%d %H:%M}" in section
    state = api_for(owner).post(f"/api/jobs/{fresh.pk}/merged/").json()  # built: the state, no second build
    assert state["merged_expires_at"] == fresh.merged_expires_at.isoformat()
    assert f"until {fresh.merged_expires_at.isoformat()}, then it is deleted" in state["detail"]

    Job.objects.filter(pk=old.pk).update(
        merged_built_at=timezone.now() - timedelta(hours=settings.MERGED_RETENTION_HOURS, minutes=1))
    assert merged.expire_merged() == 1
    old.refresh_from_db()
    assert old.merged_status == "none" and old.merged_bytes is None and not old.merged_zip_path.exists()
    assert JobLog.objects.filter(job=old, message__contains="the merged model was deleted 72 hours after").exists()
    fresh.refresh_from_db()
    assert fresh.merged_status == "ready" and fresh.merged_zip_path.is_file(), "a build within its time stays"
    assert merged.expire_merged() == 0
    section = merged_section(client.get(f"/jobs/{old.pk}/").content.decode())
    assert 'id="merged-form"' in section and 'id="merged-download"' not in section

    assert api_for(owner).post(f"/api/jobs/{old.pk}/merged/").status_code == 202  # built again on request
    old = wait_for_merged(old, celery_worker)
    assert old.merged_status == "ready" and old.merged_zip_path.is_file() and builds_of(old) == 2
