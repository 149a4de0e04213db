"""Every field a write to the API carries is honoured or refused by name, never dropped: jobs (with and
without a preset), dataset uploads, and the job actions that take no fields."""

from __future__ import annotations

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient
from web_fixtures import TINY_MODEL_ID

from webapp.datasets.models import Dataset
from webapp.datasets.services import create_dataset
from webapp.training.api_input import ACCEPTED_FIELDS
from webapp.training.models import Job

pytestmark = pytest.mark.django_db

ROWS = [{"prompt": f"Q: what is {i} plus {i}?\nA:", "completion": f" {2 * i}"} for i in range(40)]
CONTENT = ("\n".join(json.dumps(row) for row in ROWS) + "\n").encode()


@pytest.fixture
def dataset(owner):
    return create_dataset(owner, SimpleUploadedFile("sums.jsonl", CONTENT), "sums")


@pytest.fixture
def api(owner, registered_trunk, redis_server):
    client = APIClient()
    client.force_authenticate(owner)
    return client


def create(api, **fields):
    return api.post("/api/jobs/", fields, format="json")


def test_a_preset_fills_only_what_the_request_leaves_out(api, dataset):
    steps = create(api, dataset=dataset.pk, preset="balanced", max_steps=5)
    assert steps.status_code == 201, steps.content
    reply = steps.json()
    assert (reply["max_steps"], reply["epochs"], reply["learning_rate"]) == (5, None, 5e-4)
    assert Job.objects.get(pk=reply["id"]).train_config().max_steps == 5, "the job runs the steps asked for"
    rate = create(api, dataset=dataset.pk, preset="quick", learning_rate=1e-3).json()
    assert (rate["epochs"], rate["learning_rate"], rate["max_steps"]) == (2.0, 1e-3, None)
    epochs = create(api, dataset=dataset.pk, preset="thorough", epochs=1.5).json()
    assert (epochs["epochs"], epochs["learning_rate"]) == (1.5, 3e-4)


def test_epochs_and_max_steps_together_are_refused_with_the_reason(api, dataset):
    both = create(api, dataset=dataset.pk, epochs=2, max_steps=5)
    assert both.status_code == 400
    assert "give epochs or max_steps, not both" in both.json()["max_steps"][0]
    assert not Job.objects.exists()


def test_unknown_and_read_only_fields_are_refused_by_name(api, dataset):
    typo = create(api, dataset=dataset.pk, max_step=5)
    assert typo.status_code == 400
    assert list(typo.json()) == ["max_step"]
    assert "unknown field 'max_step'" in typo.json()["max_step"][0] and "max_steps" in typo.json()["max_step"][0]
    forged = create(api, dataset=dataset.pk, status="succeeded", current_step=9, id=77)
    assert forged.status_code == 400
    assert set(forged.json()) == {"status", "current_step", "id"}
    assert "current_step is read-only" in forged.json()["current_step"][0]
    assert not Job.objects.exists()


def test_booleans_are_true_or_false_and_nothing_else(api, dataset):
    vague = create(api, dataset=dataset.pk, max_steps=3, use_rslora="maybe", gradients_to_trunk=0)
    assert vague.status_code == 400
    assert vague.json() == {"use_rslora": ["use_rslora must be true or false, not 'maybe'"],
                            "gradients_to_trunk": ["gradients_to_trunk must be true or false, not 0"]}
    clear = create(api, dataset=dataset.pk, max_steps=3, gradients_to_trunk=False, train_trunk_lora="false")
    assert clear.status_code == 201, clear.content
    assert (clear.json()["gradients_to_trunk"], clear.json()["train_trunk_lora"]) == (False, False)


def test_every_accepted_field_is_honoured(api, dataset, registered_trunk):
    given = {"dataset": dataset.pk, "name": "every field", "base_model": TINY_MODEL_ID, "trunk": registered_trunk.pk,
             "adapter_method": "lora", "use_dora": False, "use_rslora": True, "lora_r": 4, "lora_alpha": 8.0,
             "lora_dropout": 0.1, "train_trunk_lora": False, "learning_rate": 1e-3, "max_steps": 3,
             "batch_size": 2, "grad_accum_steps": 2, "max_seq_length": 64, "warmup_steps": 1, "lr_schedule": "cosine",
             "seed": 7, "val_fraction": 0.2, "wire_encoding": "bf16", "bottom_layers": 1, "top_layers": 1,
             "private_bottom": 0.5, "gradients_to_trunk": True, "hidden_noise": 0.1, "grad_noise": 0.2,
             "nopeek": 0.3}
    assert set(given) | {"epochs", "preset"} == set(ACCEPTED_FIELDS), "the test names every field the API takes"
    response = create(api, **given)
    assert response.status_code == 201, response.content
    reply = response.json()
    expected = {**given, "trunk": registered_trunk.name}
    assert {name: reply[name] for name in expected} == expected
    assert reply["epochs"] is None, "max_steps sets the run length"


def test_a_dataset_upload_takes_a_file_and_a_name_only(owner, redis_server):
    api = APIClient()
    api.force_authenticate(owner)
    extra = api.post("/api/datasets/", {"file": SimpleUploadedFile("sums.jsonl", CONTENT), "name": "sums",
                                        "num_examples": 3, "title": "Sums"}, format="multipart")
    assert extra.status_code == 400
    assert set(extra.json()) == {"num_examples", "title"}
    assert "num_examples is read-only" in extra.json()["num_examples"][0]
    assert "unknown field 'title'" in extra.json()["title"][0] and "file, name" in extra.json()["title"][0]
    assert not Dataset.objects.exists()
    plain = api.post("/api/datasets/", {"file": SimpleUploadedFile("sums.jsonl", CONTENT), "name": "sums"},
                     format="multipart")
    assert plain.status_code == 201 and plain.json()["name"] == "sums"


@pytest.mark.parametrize("action", ["cancel", "resume", "merged"])
def test_job_actions_refuse_any_field(owner, redis_server, action):
    job = Job.objects.create(owner=owner, dataset_name="sums", base_model=TINY_MODEL_ID, max_steps=3,
                             status=Job.Status.FAILED)
    api = APIClient()
    api.force_authenticate(owner)
    response = api.post(f"/api/jobs/{job.pk}/{action}/", {"status": "queued"}, format="json")
    assert response.status_code == 400
    assert "status is read-only" not in response.json()["status"][0]
    assert "unknown field 'status'; this endpoint accepts no fields" in response.json()["status"][0]
    job.refresh_from_db()
    assert job.status == Job.Status.FAILED
