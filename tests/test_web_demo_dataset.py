"""The README's demo dataset for every user: one click on the datasets page, the same file `make run` gives
the admin, each user their own copy."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.urls import reverse

from webapp.datasets.demo import DEMO_NAME, add_demo_dataset
from webapp.datasets.models import Dataset
from webapp.launcher import ADMIN_USERNAME, Launcher, LauncherConfig

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def media(settings, tmp_path) -> Path:
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.MEDIA_ROOT.mkdir()
    return settings.MEDIA_ROOT


def test_a_new_user_adds_the_demo_dataset_with_one_click(client, owner):
    client.force_login(owner)
    page = client.get(reverse("datasets:list")).content.decode()
    assert "Add the demo dataset" in page and f'action="{reverse("datasets:add-demo")}"' in page

    response = client.post(reverse("datasets:add-demo"))
    dataset = Dataset.objects.get(owner=owner)
    assert response.status_code == 302 and response["Location"] == reverse("datasets:detail", args=[dataset.pk])
    assert (dataset.name, dataset.kind, dataset.num_examples) == (DEMO_NAME, "messages", 48)
    assert f"Added {DEMO_NAME}: 48 examples." in client.get(response["Location"]).content.decode()

    page = client.get(reverse("datasets:list")).content.decode()
    assert "Add the demo dataset" not in page and DEMO_NAME in page


def test_adding_it_again_keeps_one_copy(client, owner):
    client.force_login(owner)
    first = client.post(reverse("datasets:add-demo"))
    second = client.post(reverse("datasets:add-demo"))
    assert first["Location"] == second["Location"]
    assert Dataset.objects.filter(owner=owner).count() == 1


def test_each_user_gets_a_copy_of_their_own(client, owner, other):
    mine = add_demo_dataset(owner)
    client.force_login(other)
    page = client.get(reverse("datasets:list")).content.decode()
    assert "Add the demo dataset" in page  # the owner's copy is not theirs
    client.post(reverse("datasets:add-demo"))
    theirs = Dataset.objects.get(owner=other)
    assert theirs.pk != mine.pk and theirs.sha256 == mine.sha256
    assert client.get(reverse("datasets:detail", args=[mine.pk])).status_code == 404


def test_the_admin_of_make_run_gets_the_same_dataset_through_the_same_function(django_user_model, owner):
    django_user_model.objects.create_superuser(ADMIN_USERNAME, password="admin-pass-123")
    launcher = Launcher(LauncherConfig.from_env())
    launcher.demo_dataset()
    launcher.demo_dataset()  # a second run adds nothing
    admin_copy = Dataset.objects.get(owner__username=ADMIN_USERNAME)
    assert admin_copy.name == DEMO_NAME
    assert add_demo_dataset(owner).sha256 == admin_copy.sha256


def test_a_user_at_the_dataset_limit_is_told_why_and_nothing_is_added(client, owner, settings):
    settings.MAX_DATASETS_PER_USER = 1
    from django.core.files.uploadedfile import SimpleUploadedFile

    from webapp.datasets.services import create_dataset

    create_dataset(owner, SimpleUploadedFile("mine.jsonl", b'{"text": "hello"}\n'))
    client.force_login(owner)
    response = client.post(reverse("datasets:add-demo"), follow=True)
    page = response.content.decode()
    assert "Could not add the demo dataset: you already store 1 datasets, the limit per user" in page
    assert list(Dataset.objects.filter(owner=owner).values_list("name", flat=True)) == ["mine"]
