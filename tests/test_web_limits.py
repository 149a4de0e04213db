"""Per-user limits: stored datasets and jobs queued or running at once, with clear messages."""

from __future__ import annotations

import io

import pytest
from rest_framework.test import APIClient
from web_fixtures import TINY_MODEL_ID

from webapp.datasets.models import Dataset
from webapp.training.models import Job
from webapp.trunks.models import TrunkServer

pytestmark = pytest.mark.django_db


def upload(api, name):
    content = io.BytesIO(b'{"text": "a line of text"}\n')
    content.name = f"{name}.jsonl"
    return api.post("/api/datasets/", {"file": content, "name": name}, format="multipart")


@pytest.fixture
def api(owner):
    client = APIClient()
    client.force_authenticate(owner)
    return client


def test_a_user_cannot_store_more_datasets_than_the_limit(api, owner, other, settings, web_dirs):
    settings.MAX_DATASETS_PER_USER = 2
    assert upload(api, "one").status_code == 201 and upload(api, "two").status_code == 201
    files_before = sorted(p for p in (web_dirs["media"]).rglob("*") if p.is_file())
    refused = upload(api, "three")
    assert refused.status_code == 400
    assert refused.json() == {"file": ["you already store 2 datasets, the limit per user; delete one you no "
                                       "longer need to upload another"]}
    assert Dataset.objects.filter(owner=owner).count() == 2
    assert sorted(p for p in (web_dirs["media"]).rglob("*") if p.is_file()) == files_before
    theirs = APIClient()
    theirs.force_authenticate(other)
    assert upload(theirs, "mine").status_code == 201, "the limit is per user"
    api.delete(f"/api/datasets/{Dataset.objects.filter(owner=owner).first().pk}/")
    assert upload(api, "three").status_code == 201, "deleting one makes room"


def test_a_user_cannot_have_more_active_jobs_than_the_limit(api, owner, settings, web_dirs):
    settings.MAX_ACTIVE_JOBS_PER_USER = 1
    TrunkServer.objects.create(name="t", address="127.0.0.1:9", token="x" * 20, status=TrunkServer.Status.UP,
                               model_id=TINY_MODEL_ID, max_sessions=4, active_sessions=0)
    dataset_id = upload(api, "data").json()["id"]
    job = {"dataset": dataset_id, "base_model": TINY_MODEL_ID, "max_steps": 2}
    first = api.post("/api/jobs/", job, format="json")
    assert first.status_code == 201, first.content
    refused = api.post("/api/jobs/", job, format="json")
    assert refused.status_code == 400
    assert refused.json() == {"non_field_errors": ["you have 1 jobs queued or running, the limit per user is 1; "
                                                   "wait for one to finish or cancel one"]}
    assert Job.objects.count() == 1
    api.post(f"/api/jobs/{first.json()['id']}/cancel/")
    assert api.post("/api/jobs/", job, format="json").status_code == 201, "a cancelled job frees its place"
