"""The playground runs a job's adapter only on the base model its job trained on: the form refuses another
model with an error that says which, and takes the job's model when none is sent (the page's locked field)."""

from __future__ import annotations

import pytest
from django.utils.html import escape
from served_models import two_served_models

from webapp.playground.forms import PlaygroundForm
from webapp.playground.models import Generation
from webapp.training.models import Job

pytestmark = pytest.mark.django_db


@pytest.fixture
def models(web_dirs):
    with two_served_models(web_dirs["models"]) as served:
        yield served


def trained_job(owner, base_model: str) -> Job:
    return Job.objects.create(owner=owner, name="sums run", dataset_name="sums", base_model=base_model,
                              status=Job.Status.SUCCEEDED)


def test_a_base_model_other_than_the_jobs_is_refused_with_a_clear_error(client, owner, models):
    job_model, other_model = models
    job = trained_job(owner, job_model)
    client.force_login(owner)
    response = client.post("/playground/", {"job": job.pk, "base_model": other_model, "prompt": "hello",
                                            "max_new_tokens": 4, "temperature": 0, "seed": 0})
    assert response.status_code == 200
    errors = response.context["form"].errors
    assert list(errors) == ["base_model"], errors
    expected = (f"The adapter of sums run (job {job.pk}) was trained on {job_model}, so it runs only on that base "
                f"model, not on {other_model}: choose {job_model}, or 'Base model only' under Adapter to ask "
                f"{other_model} alone.")
    assert errors["base_model"] == [expected]
    assert escape(expected) in response.content.decode()
    assert not Generation.objects.exists(), "nothing was started"


def test_the_jobs_own_model_or_none_is_accepted(owner, models):
    job_model, other_model = models
    job = trained_job(owner, job_model)
    common = {"job": job.pk, "prompt": "hello", "max_new_tokens": 4, "temperature": 0, "seed": 0}
    for sent in ({"base_model": job_model}, {}):  # {}: the locked (disabled) field is not sent
        form = PlaygroundForm({**common, **sent}, user=owner)
        assert form.is_valid(), (sent, form.errors)
        assert form.comparison_arguments()["job"] == job and form.comparison_arguments()["base_model"] is None
    # Without a job, any served model is fine.
    form = PlaygroundForm({**common, "job": "", "base_model": other_model}, user=owner)
    assert form.is_valid(), form.errors
    assert form.comparison_arguments()["base_model"] == other_model


def test_the_page_tells_its_script_each_jobs_model(client, owner, other, models):
    job_model, other_model = models
    job = trained_job(owner, other_model)
    trained_job(other, job_model)  # another user's job is not listed
    client.force_login(owner)
    response = client.get("/playground/")
    assert response.context["form"].job_models == {str(job.pk): other_model}
    assert f'<script id="job-models" type="application/json">{{"{job.pk}": "{other_model}"}}</script>' in \
        response.content.decode()
