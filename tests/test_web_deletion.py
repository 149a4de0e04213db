"""Deleting what one stores: a job and every file it wrote, a dataset (not while a job uses it), a whole
user (staff), and the per-user storage quota with its usage on the pages, in the admin and in the API.

The jobs here are rows with files on disk as a worker leaves them (checkpoints, adapter, merged zip);
each test checks that the files are gone from disk and that the other user's files stay.
"""

from __future__ import annotations

import io
import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone
from rest_framework.test import APIClient
from web_fixtures import TINY_MODEL_ID

from webapp.datasets.models import Dataset
from webapp.datasets.services import create_dataset
from webapp.playground.models import Generation
from webapp.training import services
from webapp.training.models import Job, JobLog, JobSecret, MetricPoint

pytestmark = pytest.mark.django_db(transaction=True)

ROWS = "".join(json.dumps({"prompt": f"Q{i}?", "completion": f" A{i}"}) + "\n" for i in range(12)).encode()


def api_for(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


def a_dataset(owner, name="sums", data=ROWS) -> Dataset:
    return create_dataset(owner, SimpleUploadedFile(f"{name}.jsonl", data), name=name)


def stored_job(owner, dataset=None, status=Job.Status.SUCCEEDED) -> Job:
    """A job as a worker leaves it: checkpoints, an adapter, a merged zip, metrics, log lines, a generation."""
    job = Job.objects.create(owner=owner, dataset=dataset, dataset_name=dataset.name if dataset else "gone",
                             base_model=TINY_MODEL_ID, max_steps=4, status=status, current_step=4, total_steps=4,
                             finished_at=timezone.now() if status in Job.FINISHED else None)
    JobSecret.draw(job)
    for relative in ("checkpoints/step-2/trunk_state.safetensors", "checkpoints/step-4/client_state.safetensors",
                     "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "merged-model.zip"):
        path = job.directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * 4096)
    MetricPoint.objects.create(job=job, step=1, kind=MetricPoint.Kind.TRAIN, loss=1.0)
    JobLog.objects.create(job=job, message="queued")
    Generation.objects.create(owner=owner, job=job, base_model=TINY_MODEL_ID, prompt="secret prompt")
    return job


def gone(job: Job) -> bool:
    return (not job.directory.exists() and not Job.objects.filter(pk=job.pk).exists()
            and not MetricPoint.objects.filter(job_id=job.pk).exists()
            and not JobLog.objects.filter(job_id=job.pk).exists()
            and not JobSecret.objects.filter(job_id=job.pk).exists()
            and not Generation.objects.filter(job_id=job.pk).exists())


def intact(job: Job) -> bool:
    return (job.directory / "adapter" / "adapter_model.safetensors").is_file() and Job.objects.filter(pk=job.pk).exists()


def test_an_owner_deletes_a_finished_job_and_everything_it_stored(client, owner, other):
    mine, theirs = stored_job(owner), stored_job(other)
    client.force_login(other)
    assert client.get(f"/jobs/{mine.pk}/delete/").status_code == 404
    assert client.post(f"/jobs/{mine.pk}/delete/").status_code == 404
    assert intact(mine)

    client.force_login(owner)
    page = client.get(f"/jobs/{mine.pk}/").content.decode()
    assert f'id="delete-link" class="button danger" href="/jobs/{mine.pk}/delete/"' in page
    confirm = client.get(f"/jobs/{mine.pk}/delete/").content.decode()
    assert "removed for good (20 KiB)" in confirm and "Download the adapter first" in confirm
    response = client.post(f"/jobs/{mine.pk}/delete/", follow=True)
    assert response.redirect_chain[-1][0] == "/jobs/"
    assert f"Deleted job {mine.pk}" in response.content.decode()
    assert gone(mine)
    assert intact(theirs), "the other user's job and files stay"


def test_the_api_deletes_a_finished_job_and_refuses_a_running_one(owner, other):
    running, finished = stored_job(owner, status=Job.Status.RUNNING), stored_job(owner)
    assert api_for(other).delete(f"/api/jobs/{finished.pk}/").status_code == 404
    refused = api_for(owner).delete(f"/api/jobs/{running.pk}/")
    assert refused.status_code == 409
    assert "is running; cancel it first" in refused.json()["non_field_errors"][0]
    assert intact(running)
    assert api_for(owner).delete(f"/api/jobs/{finished.pk}/").status_code == 204
    assert gone(finished) and intact(running)


def test_a_dataset_a_running_job_uses_stays_and_jobs_that_trained_on_it_say_it_is_gone(client, owner):
    dataset = a_dataset(owner)
    path = dataset.file.path
    running = stored_job(owner, dataset, status=Job.Status.RUNNING)
    done = stored_job(owner, dataset)
    client.force_login(owner)
    refused = client.post(f"/datasets/{dataset.pk}/delete/")
    assert refused.status_code == 409
    assert f"sums is used by job {running.pk}, which is queued or running" in refused.content.decode()
    answer = api_for(owner).delete(f"/api/datasets/{dataset.pk}/")
    assert answer.status_code == 409 and f"job {running.pk}" in answer.json()["detail"]
    assert Dataset.objects.filter(pk=dataset.pk).exists() and open(path, "rb").read() == ROWS

    Job.objects.filter(pk=running.pk).update(status=Job.Status.CANCELLED, finished_at=timezone.now())
    assert api_for(owner).delete(f"/api/datasets/{dataset.pk}/").status_code == 204
    assert not Dataset.objects.filter(pk=dataset.pk).exists()
    with pytest.raises(FileNotFoundError):
        open(path, "rb")
    done.refresh_from_db()
    assert done.dataset is None and done.dataset_name == "sums" and intact(done), "the job keeps its record"
    assert "sums (deleted)" in client.get(f"/jobs/{done.pk}/").content.decode()
    with pytest.raises(services.JobStateError, match="its dataset \\(sums\\) was deleted"):
        services.resume_job(Job.objects.get(pk=running.pk))


def test_staff_delete_a_user_and_everything_of_theirs(client, owner, other, django_user_model):
    staff = django_user_model.objects.create_superuser("staff", password="staff-pass-123")
    leaving_dataset, staying_dataset = a_dataset(owner), a_dataset(other)
    leaving_file, staying_file = leaving_dataset.file.path, staying_dataset.file.path
    finished, running = stored_job(owner, leaving_dataset), stored_job(owner, status=Job.Status.RUNNING)
    theirs = stored_job(other, staying_dataset)
    client.force_login(staff)
    listing = client.get("/admin/auth/user/").content.decode()
    assert "Storage (of quota)" in listing and "40.5 KiB of 10 GiB (datasets 472 B, jobs 40 KiB)" in listing

    # A running job is asked to stop; the user stays until it has.
    response = client.post(f"/admin/auth/user/{owner.pk}/delete/", {"post": "yes"}, follow=True)
    assert "has 1 running job(s)" in response.content.decode()
    assert "deleted successfully" not in response.content.decode()
    assert django_user_model.objects.filter(pk=owner.pk).exists() and intact(finished) and intact(running)
    assert Job.objects.get(pk=running.pk).cancel_requested

    Job.objects.filter(pk=running.pk).update(status=Job.Status.CANCELLED, finished_at=timezone.now())
    response = client.post(f"/admin/auth/user/{owner.pk}/delete/", {"post": "yes"}, follow=True)
    assert "Deleted owner with 1 dataset(s) and 2 job(s), and their files" in response.content.decode()
    assert not django_user_model.objects.filter(pk=owner.pk).exists()
    assert gone(finished) and gone(running)
    with pytest.raises(FileNotFoundError):
        open(leaving_file, "rb")
    assert intact(theirs) and open(staying_file, "rb").read() == ROWS


def test_the_storage_quota_refuses_an_upload_past_it_and_a_new_job_once_full(client, owner, settings,
                                                                             registered_trunk):
    settings.USER_STORAGE_QUOTA_MB = 1
    half = b"".join(json.dumps({"text": "x" * 1000}).encode() + b"\n" for _ in range(500))  # 494.6 KiB
    upload = io.BytesIO(half)
    upload.name = "first.jsonl"
    first = api_for(owner).post("/api/datasets/", {"file": upload, "name": "first"}, format="multipart")
    assert first.status_code == 201, first.content
    upload = SimpleUploadedFile("second.jsonl", half + half[:100_000])
    client.force_login(owner)
    refused = client.post("/datasets/upload/", {"file": upload, "name": "second"})
    text = refused.content.decode()
    assert refused.status_code == 400 and "over your quota of 1 MiB" in text, text[-2000:]
    assert "delete datasets or jobs you no longer need" in text
    assert Dataset.objects.filter(owner=owner).count() == 1

    usage = api_for(owner).get("/api/storage/").json()
    assert usage["datasets_bytes"] == len(half) and usage["jobs_bytes"] == 0 and usage["quota_bytes"] == 1 << 20
    assert not usage["full"]
    for page in ("/datasets/", "/jobs/"):
        assert "Your storage: 494.6 KiB of 1 MiB (datasets 494.6 KiB, jobs 0 B)" in client.get(page).content.decode()

    stored_job(owner)  # 20 KiB of job files, then a dataset that fills the rest
    Dataset.objects.filter(owner=owner).update(size_bytes=(1 << 20) - 10 * 1024)
    assert api_for(owner).get("/api/storage/").json()["full"]
    created = api_for(owner).post("/api/jobs/", {"dataset": first.json()["id"], "base_model": TINY_MODEL_ID,
                                                  "max_steps": 2}, format="json")
    assert created.status_code == 400
    assert "your storage is full" in created.json()["non_field_errors"][0]
    assert "full: delete datasets or jobs" in client.get("/jobs/").content.decode()
