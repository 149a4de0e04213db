"""The guided job form: basic settings first, presets, the Advanced group, limits, names, the estimate's
inputs, and the status line a job shows before and between its steps."""

from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone
from rest_framework.test import APIClient
from web_fixtures import TINY_MODEL_ID

from splitcore.data.formats import parse_dataset
from splitcore.training import TrainConfig
from splitcore.training.batches import prepare_training_data
from webapp import base_models
from webapp.datasets.services import create_dataset
from webapp.training import estimates, presets
from webapp.training.forms import ADVANCED_FIELDS, BASIC_FIELDS, PRIVACY_FIELDS, JobForm
from webapp.training.models import Job, MetricPoint

pytestmark = pytest.mark.django_db(transaction=True)

ROWS = [{"prompt": f"Q: what is {i} plus {i}?\nA:", "completion": f" {2 * i}"} for i in range(40)]


@pytest.fixture
def dataset(owner):
    content = ("\n".join(json.dumps(row) for row in ROWS) + "\n").encode()
    return create_dataset(owner, SimpleUploadedFile("sums.jsonl", content), "sums")


def post(client, dataset, **fields):
    data = {"dataset": dataset.pk, "base_model": TINY_MODEL_ID, "batch_size": 4, "grad_accum_steps": 1,
            "max_seq_length": 64, "learning_rate": 1e-3, "epochs": 1, "lora_r": 4, "lora_alpha": 8,
            "lora_dropout": 0.0, "val_fraction": 0.1, "warmup_steps": 0, "seed": 0, **fields}
    return client.post("/jobs/new/", {k: v for k, v in data.items() if v is not None})


def test_the_form_shows_basic_settings_first_and_the_rest_under_advanced(client, owner, dataset, registered_trunk):
    client.force_login(owner)
    page = client.get("/jobs/new/").content.decode()
    advanced = page.index('<details id="advanced"')
    for name in ("dataset", "name", "base_model"):
        assert page.index(f'name="{name}"') < advanced, name
    for key in ("quick", "balanced", "thorough", "custom"):
        assert f'name="preset" value="{key}"' in page
    assert re.search(r'name="preset" value="balanced"[^>]*checked', page), "balanced is the default"
    for name in ADVANCED_FIELDS:
        assert page.index(f'name="{name}"') > advanced, name
    form = JobForm(user=owner)
    missing = [name for name in BASIC_FIELDS + ADVANCED_FIELDS + PRIVACY_FIELDS if not form.fields[name].help_text]
    assert not missing, f"fields without help text: {missing}"
    # The defaults are the balanced preset's, and the estimate's inputs are in the page.
    balanced = presets.BY_KEY["balanced"]
    assert form.fields["epochs"].initial == balanced.epochs and form.fields["learning_rate"].initial == 5e-4
    data = json.loads(re.search(r'<script id="job-estimate-data" type="application/json">(.*?)</script>', page,
                                re.S).group(1))
    assert data["datasets"] == {str(dataset.pk): {"name": "sums", "examples": 40}}
    assert data["presets"]["thorough"]["epochs"] == 5.0 and data["max_steps"] == 100_000


def test_a_preset_sets_the_run_length_and_custom_keeps_the_fields(client, owner, dataset, registered_trunk,
                                                                 redis_server):
    client.force_login(owner)
    assert post(client, dataset, preset="thorough", epochs=1, learning_rate=1e-3, max_steps=7).status_code == 302
    thorough = Job.objects.get()
    assert (thorough.epochs, thorough.learning_rate, thorough.max_steps) == (5.0, 3e-4, None)
    assert post(client, dataset, preset="custom", epochs=None, max_steps=7, learning_rate=1e-3).status_code == 302
    custom = Job.objects.exclude(pk=thorough.pk).get()
    assert (custom.epochs, custom.learning_rate, custom.max_steps) == (None, 1e-3, 7)


def test_the_api_keeps_its_own_run_length_unless_it_names_a_preset(owner, dataset, registered_trunk, redis_server):
    api = APIClient()
    api.force_authenticate(owner)
    given = api.post("/api/jobs/", {"dataset": dataset.pk, "epochs": 2, "learning_rate": 1e-3}, format="json")
    assert given.status_code == 201, given.content
    assert (given.json()["epochs"], given.json()["learning_rate"]) == (2.0, 1e-3)
    defaults = api.post("/api/jobs/", {"dataset": dataset.pk}, format="json")
    assert (defaults.json()["epochs"], defaults.json()["learning_rate"]) == (3.0, 5e-4), "the balanced preset's"
    quick = api.post("/api/jobs/", {"dataset": dataset.pk, "preset": "quick", "epochs": 9, "name": "first look"},
                     format="json")
    assert quick.status_code == 201, quick.content
    assert (quick.json()["epochs"], quick.json()["learning_rate"], quick.json()["name"]) == (9.0, 5e-4, "first look")
    bad = api.post("/api/jobs/", {"dataset": dataset.pk, "preset": "forever"}, format="json")
    assert bad.status_code == 400 and "forever" in bad.json()["preset"][0]


def test_absurd_run_lengths_are_refused_with_what_is_allowed(client, owner, dataset, registered_trunk, settings):
    client.force_login(owner)
    response = post(client, dataset, preset="custom", max_steps=1_000_000)
    assert response.status_code == 200
    assert "less than or equal to 100000" in str(response.context["form"].errors["max_steps"])
    response = post(client, dataset, preset="custom", epochs=1000)
    assert "less than or equal to 100" in str(response.context["form"].errors["epochs"])
    settings.MAX_JOB_STEPS = 50
    response = post(client, dataset, preset="custom", epochs=10, batch_size=2)  # 36 examples x 10 / 2
    assert response.context["form"].errors["epochs"] == [
        "10 epochs of sums would be 180 steps; at most 50 are allowed: train fewer epochs or more examples per step"]
    assert not Job.objects.exists()


def test_a_job_is_named_after_its_dataset_and_time_unless_given_a_name(client, owner, dataset, registered_trunk,
                                                                      redis_server):
    client.force_login(owner)
    response = post(client, dataset, preset="quick")
    assert response.status_code == 302
    job = Job.objects.get()
    # Its page says it is queued in the status line, which follows the job, not in a message that stays.
    page = client.get(response["Location"]).content.decode()
    # (A worker of another test may have taken it already: then the line says what the worker does.)
    assert 'class="messages"' not in page, re.findall(r'<ul class="messages">.*?</ul>', page, re.S)
    line = re.search(r'<p id="job-phase" class="phase">(.*?)</p>', page).group(1)
    assert line == "Queued: waiting for a free worker" or line.endswith("…"), line
    # Named just before it was saved: the same minute, or the one before when the minute turned in between.
    created = timezone.localtime(job.created_at)
    assert job.name in {f"sums · {when:%Y-%m-%d %H:%M}" for when in (created, created - timedelta(minutes=1))}
    assert post(client, dataset, preset="quick", name="  Sums, second try ").status_code == 302
    named = Job.objects.exclude(pk=job.pk).get()
    assert named.name == "Sums, second try" and named.display_name == "Sums, second try"
    for page in ("/jobs/", f"/jobs/{named.pk}/"):
        assert "Sums, second try" in client.get(page).content.decode()
    too_long = post(client, dataset, preset="quick", name="x" * 121)
    assert "at most 120 characters" in str(too_long.context["form"].errors["name"])
    # The prompt format it trains in is recorded: prompt/completion rows through the tiny model's chat template.
    assert named.chat_format is True


def test_planned_steps_count_as_the_trainer_counts(owner, dataset, web_dirs):
    examples = parse_dataset(dataset.file.open("rb").read(), "sums.jsonl").examples
    tokenizer = base_models.tokenizer(TINY_MODEL_ID)
    for epochs, batch, accum, val in ((1, 4, 1, 0.1), (3, 3, 2, 0.25), (0.5, 8, 1, 0.0), (2, 5, 3, 0.01)):
        config = TrainConfig(epochs=epochs, batch_size=batch, grad_accum=accum, seq_len=64, val_fraction=val)
        data = prepare_training_data(tokenizer, examples, config)
        assert estimates.planned_steps(40, val_fraction=val, epochs=epochs, max_steps=None, batch_size=batch,
                                       grad_accum_steps=accum) == config.total_steps(len(data.train))
    assert estimates.planned_steps(40, val_fraction=0.1, epochs=3, max_steps=11, batch_size=4,
                                   grad_accum_steps=1) == 11


def _timed_job(owner, trunk, *, batch, accum, step_seconds, startup_s, model=TINY_MODEL_ID, steps=5):
    started = timezone.now() - timedelta(hours=1)
    job = Job.objects.create(owner=owner, dataset_name="sums", base_model=model, trunk=trunk, max_steps=steps,
                             batch_size=batch, grad_accum_steps=accum, status=Job.Status.SUCCEEDED,
                             current_step=steps, attempts=1, started_at=started)
    for step in range(1, steps + 1):
        point = MetricPoint.objects.create(job=job, step=step, kind="train", loss=1.0, elapsed_s=step * step_seconds)
        MetricPoint.objects.filter(pk=point.pk).update(
            created_at=started + timedelta(seconds=startup_s + step * step_seconds))
    return job


def test_measured_rates_come_from_recent_jobs_per_model_and_trunk(owner, registered_trunk):
    # 2 s per step of 4 examples: 0.5 s per example; 6 s per step of 3 x 2 examples on the other: 1 s.
    _timed_job(owner, registered_trunk, batch=4, accum=1, step_seconds=2.0, startup_s=10.0)
    _timed_job(owner, None, batch=3, accum=2, step_seconds=6.0, startup_s=30.0)
    _timed_job(owner, None, batch=1, accum=1, step_seconds=1.0, startup_s=0.0, steps=2)  # too short to count
    rates = estimates.measured_rates()[TINY_MODEL_ID]
    on_trunk = estimates.StepRate(**rates[str(registered_trunk.pk)])
    assert on_trunk.jobs == 1 and on_trunk.seconds_per_example == pytest.approx(0.5)
    assert on_trunk.startup_s == pytest.approx(10.0, abs=0.01)
    anywhere = estimates.StepRate(**rates["any"])
    assert anywhere.jobs == 2 and anywhere.seconds_per_example == pytest.approx(0.75)
    assert anywhere.seconds(steps=10, examples_per_step=4) == pytest.approx(20.0 + 10 * 4 * 0.75, abs=0.01)
    assert estimates.rate_for("another-model") is None


def test_the_status_line_says_what_the_job_does_before_and_between_steps(owner):
    job = Job(owner=owner, status=Job.Status.QUEUED)
    assert job.status_line == "Queued: waiting for a free worker"
    job.attempts = 1
    assert job.status_line.endswith("(it continues from its last checkpoint)")
    job.status = Job.Status.RUNNING
    assert job.status_line == "Starting…"
    job.phase = "connecting to the trunk server local"
    assert job.status_line == "Connecting to the trunk server local…"
    job.phase = "training"
    assert job.status_line == "Training: starting step 1"
    job.current_step, job.total_steps = 3, 10
    assert job.status_line == "Training: step 3 of 10 done"
    job.cancel_requested = True
    assert job.status_line == "Stopping after the current step…"
    job.status = Job.Status.SUCCEEDED
    assert job.status_line == ""
