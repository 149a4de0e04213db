"""A job's settings in words: one label per hyper-parameter, on the job page and the compare page."""

from __future__ import annotations

import re

import pytest

from webapp.training.forms import JobForm
from webapp.training.models import HYPERPARAMETER_LABELS, Job

# Where the pages use other words than the form (which says "Lr schedule" after the model field).
OWN_WORDS = {"lr_schedule"}


@pytest.mark.django_db
def test_every_hyperparameter_has_the_label_the_job_form_gives_it(django_user_model):
    assert list(HYPERPARAMETER_LABELS) == list(Job().hyperparameters())
    form = JobForm(user=django_user_model.objects.create_user("owner"))
    for name, label in HYPERPARAMETER_LABELS.items():
        if name not in OWN_WORDS:
            assert form[name].label == label, f"{name}: the form says {form[name].label!r}, the pages {label!r}"


def test_values_read_as_people_write_them():
    job = Job(base_model="tiny-llama", learning_rate=1.5e-4, max_steps=20, epochs=None, lora_alpha=16.0,
              train_trunk_lora=False, gradients_to_trunk=True, wire_encoding=Job.Wire.BF16, bottom_layers=None,
              top_layers=2, hidden_noise=0.25)
    pairs = job.labelled_hyperparameters()
    assert [label for label, _ in pairs] == list(HYPERPARAMETER_LABELS.values())
    shown = dict(pairs)
    assert shown["Learning rate"] == "1.5e-04"
    assert dict(Job(learning_rate=2e-4).labelled_hyperparameters())["Learning rate"] == "2e-04"
    assert shown["Train LoRA on the trunk too"] == "no" and shown["Send gradients to the trunk"] == "yes"
    assert shown["Epochs"] == "–" and shown["Blocks kept before the trunk"] == "–"
    assert shown["Max steps"] == "20" and shown["Blocks kept after the trunk"] == "2"
    assert shown["LoRA alpha"] == "16" and shown["Noise on hidden states"] == "0.25"
    assert shown["Wire encoding"] == "bf16 (half the bytes)" and shown["Learning-rate schedule"] == "linear"
    assert job.hyperparameters()["learning_rate"] == 1.5e-4, "the machine-readable values stay as they are"


@pytest.mark.django_db
def test_the_job_page_shows_the_settings_by_their_labels(client, django_user_model):
    owner = django_user_model.objects.create_user("owner", password="owner-pass-123")
    job = Job.objects.create(owner=owner, dataset_name="notes", base_model="tiny-llama", max_steps=6, lora_r=4,
                             learning_rate=2e-4, train_trunk_lora=False)
    client.force_login(owner)
    html = client.get(f"/jobs/{job.pk}/").content.decode()
    section = re.search(r"<h2>Hyper-parameters</h2>\s*<section[^>]*>(.*?)</section>", html, re.S).group(1)
    facts = dict(re.findall(r"<dt>(.*?)</dt><dd>(.*?)</dd>", section))
    assert facts["LoRA rank r"] == "4" and facts["Learning rate"] == "2e-04"
    assert facts["Train LoRA on the trunk too"] == "no" and facts["Epochs"] == "–"
    assert len(facts) == len(HYPERPARAMETER_LABELS) and not [label for label in facts if "_" in label]
