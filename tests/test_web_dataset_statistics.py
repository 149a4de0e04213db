"""A large dataset's token statistics: counted once by a real Celery worker (the control queue), kept
on the dataset, and shown by its page, which says it is counting meanwhile and reloads."""

from __future__ import annotations

import json

import pytest
from django.core.cache import cache
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from polling import wait_until
from web_fixtures import TINY_MODEL_ID

from splitcore.data.examples import token_stats, tokenize_examples
from splitcore.data.formats import parse_dataset
from webapp import base_models
from webapp.datasets import services
from webapp.datasets.models import Dataset

pytestmark = pytest.mark.django_db(transaction=True)

ROWS = [{"prompt": f"Q: what is {i} plus {i}?\nA:", "completion": f" {2 * i}"} for i in range(30)]
DATA = "".join(json.dumps(row) + "\n" for row in ROWS).encode()


def counted(dataset: Dataset, max_length: int, timeout: float = 120) -> dict:
    key = f"{TINY_MODEL_ID}|{max_length}"

    def counted_yet() -> bool:
        dataset.refresh_from_db()
        return key in dataset.stats_cache

    wait_until(counted_yet, f"the worker counted {key}", timeout=timeout, observed=lambda: dataset.stats_cache,
               interval=0.2)
    return dataset.stats_cache[key]


def expected(max_length: int):
    tokenizer = base_models.tokenizer(TINY_MODEL_ID)
    examples = parse_dataset(DATA, "sums.jsonl").examples
    return token_stats(tokenize_examples(tokenizer, examples, max_length), max_length)


def test_a_large_datasets_statistics_are_counted_once_by_a_worker(owner, client, celery_worker, web_dirs,
                                                                 monkeypatch):
    monkeypatch.setattr(services, "INLINE_STATISTICS_EXAMPLES", 10)  # 30 examples count as large here
    dataset = services.create_dataset(owner, SimpleUploadedFile("sums.jsonl", DATA), name="sums")
    # The upload asked a worker for the default model's statistics at the default length.
    assert counted(dataset, services.DEFAULT_MAX_LENGTH)["total_tokens"] == expected(512).total_tokens
    client.force_login(owner)
    url = reverse("datasets:detail", args=[dataset.pk])
    page = client.get(url)
    assert page.context["stats"] == expected(512) and not page.context["stats_pending"]
    assert "http-equiv=\"refresh\"" not in page.content.decode()

    # Another length: the page says a worker counts it and reloads; then it shows the count.
    page = client.get(url, {"max_length": 16})
    html = page.content.decode()
    assert page.status_code == 200 and page.context["stats"] is None and page.context["stats_pending"]
    assert '<meta http-equiv="refresh" content="5">' in html and "in the background" in html
    assert cache.get(f"dataset-stats:{dataset.pk}:{TINY_MODEL_ID}|16") == 1, "asked for once, noted"
    counted(dataset, 16)
    page = client.get(url, {"max_length": 16})
    assert page.context["stats"] == expected(16) and 0 < page.context["stats"].truncated
    assert '<table class="stats">' in page.content.decode()
