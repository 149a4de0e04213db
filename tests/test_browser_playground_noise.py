"""The playground's note on blurred prompts follows the chosen adapter in a real headless Chromium, before
anything is sent."""

from __future__ import annotations

import pytest
from browser_fixtures import browser, log_in, page  # noqa: F401 - fixtures
from playwright.sync_api import expect
from web_fixtures import TINY_MODEL_ID

from webapp.training.models import Job

pytestmark = pytest.mark.django_db(transaction=True)


def finished_job(owner, name: str, hidden_noise: float) -> Job:
    job = Job.objects.create(owner=owner, name=name, base_model=TINY_MODEL_ID, dataset_name="diary",
                             status=Job.Status.SUCCEEDED, hidden_noise=hidden_noise)
    job.adapter_dir.mkdir(parents=True, exist_ok=True)
    (job.adapter_dir / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    return job


def test_the_note_says_whether_the_chosen_adapters_prompts_are_blurred(page, django_user_model, web_dirs):
    log_in(page, django_user_model)
    owner = django_user_model.objects.get(username="ada")
    noisy, plain = finished_job(owner, "noisy", 0.75), finished_job(owner, "plain", 0.0)

    page.goto(f"/playground/?job={plain.pk}")
    hint = page.locator("#noise-hint")
    expect(hint).to_contain_text("This job trained without hidden-state noise")
    page.select_option("#id_job", str(noisy.pk))
    expect(hint).to_contain_text("Prompts to this adapter are blurred")
    expect(hint).to_contain_text("Gaussian noise of 0.75 × their median norm")
    page.select_option("#id_job", "")
    expect(hint).to_contain_text("Prompts to the base model alone reach the trunk unblurred")
