"""Training jobs end to end: a real Redis, a real Celery worker process, a real trunk server.

Upload -> job -> the worker trains it through the trunk -> metrics rows -> the adapter zip
loads with peft. Cancel and resume; a trunk that is down fails the job with a message; a
redelivered task never runs a job twice; other users see nothing.
"""

from __future__ import annotations

import io
import json
import re
import time
import zipfile

import pytest
import torch
from peft import PeftModel
from rest_framework.test import APIClient
from transformers import AutoModelForCausalLM, AutoTokenizer
from trunk_process import start_trunk
from web_fixtures import TINY_MODEL_ID, WORKER_TRUNK_WAIT_S, wait_for_job
from web_jobs import JOB, upload

from splitcore.remote.client import TrunkClient
from webapp.datasets.models import Dataset
from webapp.training.forms import JobForm
from webapp.training.lease import claim
from webapp.training.models import Job, MetricPoint
from webapp.training.tasks import run_job
from webapp.trunks.models import TrunkServer

pytestmark = pytest.mark.django_db(transaction=True)

@pytest.fixture
def api(owner):
    client = APIClient()
    client.force_authenticate(owner)
    return client


def test_upload_train_download_and_load_the_adapter(client, owner, registered_trunk, celery_worker, tmp_path):
    client.force_login(owner)
    api = APIClient()
    api.force_authenticate(owner)
    dataset_id = upload(api)

    response = client.post("/jobs/new/", {**JOB, "dataset": dataset_id, "train_trunk_lora": "on",
                                          "lr_schedule": "cosine", "wire_encoding": "fp32", "seed": 0,
                                          "warmup_steps": 1})
    assert response.status_code == 302, response.context["form"].errors
    job = Job.objects.get(owner=owner)
    assert response["Location"] == f"/jobs/{job.pk}/"

    job = wait_for_job(job.pk, worker=celery_worker)
    assert job.status == "succeeded", job.error_message
    assert job.current_step == job.total_steps == 6 and job.attempts == 1
    assert job.trunk == registered_trunk and job.started_at and job.finished_at
    steps = list(MetricPoint.objects.filter(job=job, kind="train").values_list("step", flat=True))
    assert steps == [1, 2, 3, 4, 5, 6]
    assert MetricPoint.objects.filter(job=job, kind="eval").exists()
    assert all(p.wire_bytes > 0 for p in MetricPoint.objects.filter(job=job, kind="train"))

    page = client.get(f"/jobs/{job.pk}/").content.decode()
    download = re.search(r'<a id="download-link"[^>]*>', page).group(0)
    assert "succeeded" in page and f'href="/jobs/{job.pk}/adapter/"' in download and "hidden" not in download
    assert 'id="resume-form"' in page and re.search(r'<form id="cancel-form"[^>]*hidden', page)

    response = client.get(f"/jobs/{job.pk}/adapter/")
    assert response.status_code == 200 and response["Content-Type"] == "application/zip"
    bundle = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))
    assert sorted(bundle.namelist()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                         "metrics.csv", "training_args.json"]
    card = bundle.read("README.md").decode()
    assert TINY_MODEL_ID in card and "PeftModel.from_pretrained" in card and "sums" in card
    assert f"# {job.display_name}: a LoRA adapter for {TINY_MODEL_ID} (job {job.pk})" in card
    # Prompt/completion rows trained through the tiny model's chat template: the card says to ask that way.
    assert job.chat_format is True and "apply_chat_template" in card
    args = json.loads(bundle.read("training_args.json"))
    assert args["max_steps"] == 6 and args["name"] == job.display_name and args["chat_format"] is True
    assert job.phase == "", "a finished job is doing nothing"
    assert bundle.read("metrics.csv").decode().splitlines()[0].startswith("step,kind,loss")
    bundle.extractall(tmp_path / "adapter")

    model_dir = registered_trunk_model_dir()
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("Q: what is 3 plus 3?\nA:", return_tensors="pt").input_ids
    with torch.no_grad():
        before = base(ids).logits
        adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(ids).logits
    assert (adapted - before).abs().max().item() > 1e-3


def registered_trunk_model_dir():
    from django.conf import settings

    return settings.MODELS_DIR / TINY_MODEL_ID


def test_api_creates_lists_and_reports_field_errors(api, owner, other, registered_trunk, celery_worker):
    dataset_id = upload(api)
    foreign = Dataset.objects.create(owner=other, name="theirs", file="x.jsonl", original_filename="x.jsonl",
                                     file_format="jsonl", kind="text", num_examples=1, size_bytes=1, sha256="0")

    bad = api.post("/api/jobs/", {"dataset": dataset_id, "batch_size": 0, "lr_schedule": "step"}, format="json")
    assert bad.status_code == 400
    errors = bad.json()
    assert "batch_size" in errors and "lr_schedule" in errors
    assert api.post("/api/jobs/", {}, format="json").json()["dataset"] == ["This field is required."]
    not_mine = api.post("/api/jobs/", {**JOB, "dataset": foreign.pk}, format="json")
    assert not_mine.status_code == 400 and "dataset" in not_mine.json()
    assert not Job.objects.exists(), "nothing is stored for a rejected job"

    created = api.post("/api/jobs/", {**JOB, "dataset": dataset_id}, format="json")
    assert created.status_code == 201, created.content
    job_id = created.json()["id"]
    assert created.json()["train_trunk_lora"] is True, "omitted fields take the form's defaults"
    assert [j["id"] for j in api.get("/api/jobs/").json()["results"]] == [job_id]
    job = wait_for_job(job_id, worker=celery_worker)
    assert job.status == "succeeded", job.error_message

    detail = api.get(f"/api/jobs/{job_id}/").json()
    assert detail["status"] == "succeeded" and detail["adapter_url"] == f"/api/jobs/{job_id}/adapter/"
    metrics = api.get(f"/api/jobs/{job_id}/metrics/").json()["results"]
    assert [m["step"] for m in metrics if m["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    later = api.get(f"/api/jobs/{job_id}/metrics/?after=4").json()["results"]
    assert [m["step"] for m in later if m["kind"] == "train"] == [5, 6] and all(m["step"] > 4 for m in later)
    assert api.get(f"/api/jobs/{job_id}/metrics/?after=x").status_code == 400
    assert api.get(f"/api/jobs/{job_id}/adapter/").status_code == 200
    assert api.post(f"/api/jobs/{job_id}/cancel/").status_code == 409


def test_cancel_a_running_job_then_resume_it_from_its_checkpoint(api, owner, registered_trunk, celery_worker):
    dataset_id = upload(api)
    job_id = api.post("/api/jobs/", {**JOB, "dataset": dataset_id, "max_steps": 40}, format="json").json()["id"]
    wait_for_job(job_id, condition=lambda j: j.current_step >= 3, worker=celery_worker)
    assert api.post(f"/api/jobs/{job_id}/cancel/").json()["cancel_requested"] is True
    job = wait_for_job(job_id, worker=celery_worker)
    assert job.status == "cancelled" and job.current_step < 40
    assert "resume" in job.error_message
    stopped_at = job.current_step
    assert (job.checkpoint_dir / f"step-{stopped_at:08d}").is_dir(), "cancel keeps a checkpoint"

    assert api.post(f"/api/jobs/{job_id}/resume/").json()["status"] == "queued"
    job = wait_for_job(job_id, worker=celery_worker)
    assert job.status == "succeeded", job.error_message
    steps = list(MetricPoint.objects.filter(job=job, kind="train").values_list("step", flat=True))
    assert steps == list(range(1, 41)), "every step once: no gap, no repeat"
    assert job.attempts == 2


def test_a_job_whose_trunk_is_down_fails_with_a_clear_message(api, owner, celery_worker, web_trunk):
    dead = TrunkServer.objects.create(name="dead", address="127.0.0.1:9", token=web_trunk.token,
                                      status=TrunkServer.Status.UP, model_id=TINY_MODEL_ID, max_sessions=4,
                                      active_sessions=0)
    dataset_id = upload(api)
    job_id = api.post("/api/jobs/", {**JOB, "dataset": dataset_id, "trunk": dead.pk}, format="json").json()["id"]
    job = wait_for_job(job_id, timeout=120, worker=celery_worker)
    assert job.status == "failed"
    assert job.error_message.startswith("the trunk server dead at 127.0.0.1:9 could not be reached (UNAVAILABLE")
    assert f"after waiting {WORKER_TRUNK_WAIT_S} s; check that it is running, then resume" in job.error_message


def test_a_redelivered_task_never_runs_a_job_twice(api, owner, registered_trunk, celery_worker):
    dataset_id = upload(api)
    job_id = api.post("/api/jobs/", {**JOB, "dataset": dataset_id}, format="json").json()["id"]
    run_job.delay(job_id)  # the same message delivered again
    run_job.delay(job_id)
    job = wait_for_job(job_id, worker=celery_worker)
    assert job.status == "succeeded"
    assert job.attempts == 1
    assert list(MetricPoint.objects.filter(job=job, kind="train").values_list("step", flat=True)) == list(range(1, 7))
    assert claim(job_id) is None, "a finished job cannot be claimed"


def test_other_users_and_anonymous_clients_see_nothing(client, owner, other, registered_trunk, celery_worker):
    api = APIClient()
    api.force_authenticate(owner)
    dataset_id = upload(api)
    job_id = api.post("/api/jobs/", {**JOB, "dataset": dataset_id}, format="json").json()["id"]
    wait_for_job(job_id, worker=celery_worker)

    client.force_login(other)
    for url in (f"/jobs/{job_id}/", f"/jobs/{job_id}/adapter/"):
        assert client.get(url).status_code == 404, url
    for url in (f"/jobs/{job_id}/cancel/", f"/jobs/{job_id}/resume/"):
        assert client.post(url).status_code == 404, url
    assert f"/jobs/{job_id}/" not in client.get("/jobs/").content.decode()
    intruder = APIClient()
    intruder.force_authenticate(other)
    for url in (f"/api/jobs/{job_id}/", f"/api/jobs/{job_id}/metrics/", f"/api/jobs/{job_id}/adapter/"):
        assert intruder.get(url).status_code == 404, url
    for url in (f"/api/jobs/{job_id}/cancel/", f"/api/jobs/{job_id}/resume/"):
        assert intruder.post(url).status_code == 404, url
    assert intruder.get("/api/jobs/").json()["results"] == []

    anonymous = APIClient()
    for url in (f"/api/jobs/{job_id}/", "/api/jobs/", f"/api/jobs/{job_id}/adapter/"):
        assert anonymous.get(url).status_code in (401, 403), url
    client.logout()
    for url in ("/jobs/", f"/jobs/{job_id}/", f"/jobs/{job_id}/adapter/", "/jobs/new/"):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/accounts/login/"), url
    assert Job.objects.get(pk=job_id).status == "succeeded", "nothing the others did changed the job"


def test_a_trunk_at_its_session_cap_makes_the_job_wait_not_fail(api, owner, web_dirs, celery_worker, tmp_path):
    from webapp.trunks.health import check_trunk

    full = start_trunk(web_dirs["models"] / TINY_MODEL_ID, tmp_path, "--max-sessions", "1")
    try:
        trunk = TrunkServer.objects.create(name="full", address=full.address, token=full.token)
        check_trunk(trunk)
        holder = TrunkClient(full.address, full.token)
        holder.open_session(None)  # another user's session takes the only place
        dataset_id = upload(api)
        job_id = api.post("/api/jobs/", {**JOB, "dataset": dataset_id, "trunk": trunk.pk},
                          format="json").json()["id"]
        wait_for_job(job_id, worker=celery_worker, timeout=120, condition=lambda j: j.logs.filter(
            message__contains="at its session capacity; waiting").exists())
        # Time passing is the point: longer than a job waits for an unreachable trunk.
        time.sleep(2 * WORKER_TRUNK_WAIT_S)
        assert Job.objects.get(pk=job_id).status == "running", "waiting for capacity is not a failure"
        holder.close_session()
        holder.close()
        job = wait_for_job(job_id, worker=celery_worker)
        assert job.status == "succeeded", job.error_message
        assert job.current_step == 6
    finally:
        full.stop()


# ------------------------------------------------------------------ a trunk's per-session budgets


def budgeted_trunk(name: str, **budgets) -> TrunkServer:
    """A healthy trunk of the tiny model as its last check recorded it, with some per-session budgets."""
    return TrunkServer.objects.create(
        name=name, address=f"{name}.example:50051", token="x" * 24, status=TrunkServer.Status.UP,
        model_id=TINY_MODEL_ID, num_layers=6, trunk_start=2, trunk_end=4, max_sessions=4, active_sessions=0,
        **budgets)


def job_form(owner, dataset_id: int, **given) -> JobForm:
    """The job form as the API fills it in: every field the request leaves out takes its starting value."""
    initial = {name: field.initial for name, field in JobForm(user=owner).fields.items() if field.initial is not None}
    return JobForm(data={**initial, **JOB, "dataset": dataset_id, **given}, user=owner)


def test_a_chosen_trunk_refuses_settings_beyond_its_budgets_on_the_fields_that_change_them(api, owner, web_dirs):
    capped = budgeted_trunk("capped", max_lora_rank=8, max_micro_batches=4, max_tokens_per_request=1024,
                            max_positions=512)
    dataset_id = upload(api)
    refused = api.post("/api/jobs/", {**JOB, "dataset": dataset_id, "trunk": capped.pk, "lora_r": 16,
                                      "grad_accum_steps": 5, "batch_size": 4, "max_seq_length": 600},
                       format="json")
    assert refused.status_code == 400
    assert refused.json() == {
        "lora_r": ["capped would refuse a trunk LoRA of rank 16; it allows rank 8; lower the rank, choose another "
                   "trunk, or turn off 'Train LoRA on the trunk too'"],
        "grad_accum_steps": ["capped would refuse 5 micro-batches per step (gradient accumulation); it allows 4; "
                             "accumulate fewer micro-batches or choose another trunk"],
        "batch_size": ["capped would refuse micro-batches of up to 4 x 600 = 2400 tokens; it allows 1024 per call "
                       "(lower the batch size or the sequence length); lower the batch size or the max sequence "
                       "length, or choose another trunk"],
        "max_seq_length": ["capped would refuse sequences of 600 tokens; the model has 512 positions; lower the max "
                           "sequence length"],
    }
    assert not Job.objects.exists()

    assert job_form(owner, dataset_id, trunk=capped.pk, lora_r=8).is_valid()
    assert job_form(owner, dataset_id, trunk=capped.pk, lora_r=16, train_trunk_lora=False).is_valid(), \
        "without a trunk LoRA the trunk's rank cap does not apply"
    TrunkServer.objects.filter(pk=capped.pk).update(max_lora_rank=None)  # a trunk that reports no cap
    assert job_form(owner, dataset_id, trunk=capped.pk, lora_r=256).is_valid()


def test_auto_choice_needs_a_trunk_whose_budgets_take_the_job(api, owner, web_dirs):
    budgeted_trunk("small", max_lora_rank=4)
    dataset_id = upload(api)
    refused = api.post("/api/jobs/", {**JOB, "dataset": dataset_id, "lora_r": 16}, format="json")
    assert refused.status_code == 400
    assert refused.json() == {"non_field_errors": [
        f"no healthy trunk for '{TINY_MODEL_ID}' takes these settings (small would refuse a trunk LoRA of rank 16; "
        "it allows rank 4); change them, or ask an administrator for a trunk with larger budgets"]}
    assert job_form(owner, dataset_id, lora_r=16, train_trunk_lora=False).is_valid()

    budgeted_trunk("large", max_lora_rank=64)
    assert job_form(owner, dataset_id, lora_r=16).is_valid()
