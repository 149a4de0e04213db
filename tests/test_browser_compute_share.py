"""The job form's line on the split of compute follows the cut fields live, in a real headless Chromium against
daphne, and says what the server says (webapp/training/compute.py: cut_words) for the same cut."""

from __future__ import annotations

import pytest
from browser_fixtures import browser, log_in, page  # noqa: F401 - fixtures
from playwright.sync_api import expect
from web_fixtures import TINY_MODEL_ID

from webapp.training.compute import cut_words
from webapp.trunks.models import TrunkServer

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_compute_line_follows_the_cut_as_it_is_typed(page, django_user_model, settings, web_dirs):  # noqa: F811
    settings.MODELS_DIR = web_dirs["models"]  # as the web server process has it
    TrunkServer.objects.create(name="a", address="a.example:50051", token="t" * 24, status=TrunkServer.Status.UP,
                               model_id=TINY_MODEL_ID, model_type="llama", num_layers=6, trunk_start=2, trunk_end=4,
                               min_trunk_start=1, max_trunk_end=5, max_sessions=4, active_sessions=0)
    log_in(page, django_user_model)
    page.goto("/jobs/new/")
    line = page.locator("#compute-share")
    expect(line).to_have_text(cut_words(TINY_MODEL_ID, (None, None)))
    assert "2 blocks before it and 2 after it, your workers run 4 of 6 blocks" in line.text_content()
    page.fill("input[name=bottom_layers]", "1")
    expect(line).to_have_text(cut_words(TINY_MODEL_ID, (1, None)))
    page.fill("input[name=top_layers]", "1")
    expect(line).to_have_text(cut_words(TINY_MODEL_ID, (1, 1)))
    assert line.text_content().startswith("At this cut your workers run 2 of 6 blocks and the LM head (")
    page.fill("input[name=top_layers]", "5")
    expect(line).to_have_text(cut_words(TINY_MODEL_ID, (1, 5)))
    assert "keep at least 1 before the trunk and 1 after it, and at most 5 in all" in line.text_content()
