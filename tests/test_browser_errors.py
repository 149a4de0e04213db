"""In the browser: the upload form refuses a file over the site's limit before sending any of it."""

from __future__ import annotations

import pytest
from browser_fixtures import ARTIFACTS, browser, log_in, page  # noqa: F401 - fixtures
from django.conf import settings
from playwright.sync_api import expect

from webapp.datasets.models import Dataset

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_file_over_the_limit_is_refused_before_it_is_sent_and_a_small_one_still_goes(page, django_user_model,
                                                                                     tmp_path):
    assert settings.DATASET_MAX_UPLOAD_BYTES == 50 * 1024 * 1024  # the web server's default limit
    log_in(page, django_user_model)
    page.goto("/datasets/")
    posts = []
    page.on("request", lambda request: posts.append(request.url) if request.method == "POST" else None)

    big = tmp_path / "big.jsonl"
    with big.open("wb") as handle:  # 54.5 MiB, sparse: nothing to write
        handle.truncate(54 * 1024 * 1024 + 512 * 1024)
    page.set_input_files("input[type=file]", str(big))
    refusal = page.locator("[data-upload-refusal]")
    expected = ("big.jsonl: the file is 54.5 MiB, over the upload limit of 50 MiB; split it into smaller files. "
                "Nothing was uploaded.")
    expect(refusal).to_have_text(expected)  # said as soon as the file is chosen
    page.get_by_role("button", name="Upload").click()
    expect(refusal).to_have_text(expected)
    expect(page).to_have_url("/datasets/")
    page.screenshot(path=str(ARTIFACTS / "dataset-upload-too-large.png"), full_page=True)
    assert posts == []
    assert not Dataset.objects.exists()

    small = tmp_path / "small.jsonl"
    small.write_bytes(b'{"text": "a small file"}\n')
    page.set_input_files("input[type=file]", str(small))
    expect(refusal).to_be_hidden()
    page.get_by_role("button", name="Upload").click()
    expect(page.get_by_text("Uploaded small: 1 examples.")).to_be_visible()
    assert Dataset.objects.get().name == "small"
