"""The job form's words: one label per setting (the form, the job page and the compare page say the same), and
help that uses the words of the choices it describes."""

from __future__ import annotations

import re

import pytest

from webapp.training.forms import FIELDS, JobForm
from webapp.training.models import HYPERPARAMETER_LABELS, Job

pytestmark = pytest.mark.django_db


def test_the_form_labels_each_setting_as_the_job_page_does(client, owner, registered_trunk):
    form = JobForm(user=owner)
    differing = {name: (form[name].label, label) for name, label in HYPERPARAMETER_LABELS.items()
                 if name in form.fields and form[name].label != label}
    assert not differing, f"the form and the pages name these settings differently: {differing}"
    assert set(HYPERPARAMETER_LABELS) <= set(FIELDS) | {"base_model"}
    client.force_login(owner)
    page = client.get("/jobs/new/").content.decode()
    assert '<label for="id_lr_schedule">Learning-rate schedule</label>' in page
    assert "Lr schedule" not in page
    job = Job.objects.create(owner=owner, dataset_name="notes", base_model="tiny-llama", max_steps=6)
    assert "<dt>Learning-rate schedule</dt>" in client.get(f"/jobs/{job.pk}/").content.decode()


def test_the_gradients_help_uses_the_words_of_its_choices(client, owner, registered_trunk):
    form = JobForm(user=owner)
    choices = [label.split(":")[0] for _, label in form.fields["gradients_to_trunk"].widget.choices]
    assert choices == ["yes", "no"]
    help_text = form.fields["gradients_to_trunk"].help_text
    assert re.match(r"yes: .*; no: ", help_text), help_text
    assert "off" not in help_text and "'Train LoRA on the trunk too'" in help_text
    client.force_login(owner)
    page = client.get("/jobs/new/").content.decode()
    select = re.search(r'<select name="gradients_to_trunk".*?</select>', page, re.S).group(0)
    assert [label.split(":")[0] for label in re.findall(r"<option[^>]*>(.*?)</option>", select)] == ["yes", "no"]
