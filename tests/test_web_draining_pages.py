"""The playground and the job form while the only trunk server is up but draining: both pages say so (which
trunk, that new work cannot start, what to do), the job form still offers the model with its settings, and
sending either form is refused with the same reason and stores nothing."""

from __future__ import annotations

import json
import re

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils.html import escape
from web_fixtures import TINY_MODEL_ID

from webapp.datasets.services import create_dataset
from webapp.playground.models import Generation
from webapp.training.models import Job
from webapp.trunks import actions

pytestmark = pytest.mark.django_db

PLAYGROUND_NOTICE = ("local, the only trunk server up, is draining for maintenance: it takes no new playground "
                     "sessions, so none can start now. An administrator can end the drain on the fleet page or start "
                     "another trunk server; then try again.")
JOB_NOTICE = (f"local, the only trunk server up for {TINY_MODEL_ID}, is draining for maintenance: it takes no new "
              "jobs, so none can start now.")


@pytest.fixture
def draining_trunk(registered_trunk):
    actions.drain(registered_trunk)
    return registered_trunk


@pytest.fixture
def owner_client(client, owner):
    client.force_login(owner)
    return client


def test_the_playground_says_the_only_trunk_is_draining_and_refuses_to_start(owner_client, draining_trunk):
    page = owner_client.get("/playground/").content.decode()
    assert escape(PLAYGROUND_NOTICE) in page
    assert "No trunk server is up" not in page

    response = owner_client.post("/playground/", {"prompt": "Hello", "max_new_tokens": 4, "temperature": 0,
                                                  "seed": 0, "base_model": TINY_MODEL_ID})
    assert response.status_code == 200
    assert response.context["form"].non_field_errors() == [PLAYGROUND_NOTICE]
    assert not Generation.objects.exists()

    actions.end_drain(draining_trunk)  # the notice goes with the drain
    page = owner_client.get("/playground/").content.decode()
    assert 'id="trunk-notice"' not in page and f'<option value="{TINY_MODEL_ID}"' in page


def test_the_job_form_offers_the_draining_trunks_model_and_says_why_a_job_cannot_start(owner_client, owner,
                                                                                      draining_trunk):
    dataset = create_dataset(owner, SimpleUploadedFile("sums.jsonl", b'{"text": "one plus one is two"}\n' * 20),
                             "sums")
    page = owner_client.get("/jobs/new/").content.decode()
    option = re.search(r'<select name="base_model"[^>]*>(.*?)</select>', page, re.S).group(1)
    assert re.search(rf'<option value="{TINY_MODEL_ID}" selected>{TINY_MODEL_ID} \(trunk draining: no new jobs '
                     r'now\)</option>', option), option
    assert escape(JOB_NOTICE) in page
    # The privacy part knows the draining trunk's default cut, as it would a healthy trunk's.
    assert escape("At the trunk's default cut, 2 blocks before it and 2 after it") in page
    compute = json.loads(re.search(r'<script id="job-compute-data" type="application/json">(.*?)</script>', page,
                                   re.S).group(1))
    assert compute["models"][TINY_MODEL_ID]["default_cut"] == [2, 2]

    response = owner_client.post("/jobs/new/", {
        "dataset": dataset.pk, "base_model": TINY_MODEL_ID, "preset": "quick", "batch_size": 4, "grad_accum_steps": 1,
        "max_seq_length": 64, "learning_rate": 1e-3, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        "val_fraction": 0.1, "warmup_steps": 0, "seed": 0})
    assert response.status_code == 200
    errors = response.context["form"].errors
    assert list(errors) == ["base_model"] and errors["base_model"][0].startswith(JOB_NOTICE), errors
    assert not Job.objects.exists()
