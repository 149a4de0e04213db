"""A refused dataset lists its problems at once: up to 20, each with its line or row, then how many more;
and nothing of it is stored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dataset_files import jsonl
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from django.utils.html import escape
from rest_framework.test import APIClient

from splitcore.data.formats import MAX_REPORTED_PROBLEMS, DatasetFormatError, parse_dataset
from webapp.datasets.models import Dataset

GOOD = {"text": "a fine example"}


@pytest.fixture(autouse=True)
def media(settings, tmp_path) -> Path:
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.MEDIA_ROOT.mkdir()
    return settings.MEDIA_ROOT


def rejected(data: bytes, filename: str) -> DatasetFormatError:
    with pytest.raises(DatasetFormatError) as caught:
        parse_dataset(data, filename)
    return caught.value


def with_bad_lines(bad_lines: list[int], total: int) -> bytes:
    """A JSONL file of ``total`` lines, those in ``bad_lines`` not JSON."""
    return "".join(("{broken\n" if number in bad_lines else json.dumps(GOOD) + "\n")
                   for number in range(1, total + 1)).encode()


def stored_files(media: Path) -> list[Path]:
    return [path for path in media.rglob("*") if path.is_file()]


# ---------------------------------------------------------------- the parser


def test_every_bad_line_is_reported_with_its_number_in_file_order():
    error = rejected(jsonl(GOOD, {"text": 3}, GOOD, {"prompt": "p"}, ["not", "an", "object"], GOOD), "d.jsonl")
    assert error.problems == (
        ("line 2", '"text" must be a string, got a number'),
        ("line 4", 'missing field "completion"; a prompt/completion row needs both'),
        ("line 5", "expected a JSON object, got an array; JSONL needs one object per line, not one JSON array "
                   "for the whole file"),
    )
    assert error.unreported == 0
    # The first problem is still the error's own location and reason.
    assert (error.location, error.reason) == ("line 2", '"text" must be a string, got a number')
    assert error.messages() == [
        'd.jsonl: line 2: "text" must be a string, got a number',
        'd.jsonl: line 4: missing field "completion"; a prompt/completion row needs both',
        "d.jsonl: line 5: expected a JSON object, got an array; JSONL needs one object per line, not one JSON "
        "array for the whole file",
    ]
    assert str(error) == "\n".join(error.messages())


def test_twenty_problems_are_listed_and_the_rest_counted():
    bad = list(range(2, 2 + 2 * 27, 2))  # 27 bad lines: 2, 4, ..., 54
    error = rejected(with_bad_lines(bad, 60), "many.jsonl")
    assert MAX_REPORTED_PROBLEMS == 20
    assert [location for location, _ in error.problems] == [f"line {number}" for number in bad[:20]]
    assert error.unreported == 7
    messages = error.messages()
    assert len(messages) == 21
    assert messages[0].startswith("many.jsonl: line 2: invalid JSON")
    assert messages[-1] == "and 7 more problems (only the first 20 are listed)"


def test_exactly_twenty_problems_have_no_more_line():
    error = rejected(with_bad_lines(list(range(1, 21)), 25), "twenty.jsonl")
    assert len(error.problems) == 20 and error.unreported == 0
    assert not error.messages()[-1].startswith("and ")


def test_one_more_problem_is_said_in_the_singular():
    error = rejected(with_bad_lines(list(range(1, 22)), 21), "d.jsonl")
    assert error.messages()[-1] == "and 1 more problem (only the first 20 are listed)"


def test_csv_rows_are_each_reported_with_their_row_number():
    data = b'text,source\nfine,a\n"",b\nalso fine,c\nx,y,z\n  ,d\n'
    error = rejected(data, "rows.csv")
    assert error.problems == (
        ("row 3", "column 'text' is empty"),
        ("row 5", "3 fields but the header has 2 columns; put fields that contain commas in double quotes"),
        ("row 6", "column 'text' is empty"),
    )


def test_rows_of_another_kind_are_each_a_problem():
    data = jsonl(GOOD, {"prompt": "p", "completion": "c"}, GOOD, {"prompt": "q", "completion": "d"})
    error = rejected(data, "mixed.jsonl")
    assert [location for location, _ in error.problems] == ["line 2", "line 4"]
    assert all(reason.startswith("this row is prompt/completion but line 1 is text") for _, reason in error.problems)


def test_a_problem_that_ends_the_reading_comes_after_those_before_it():
    # An unclosed quote swallows what follows: the rows before it are still reported, then the quote.
    data = b'text\n"a",b\nfine\n"open quote\nmore\n'
    error = rejected(data, "quote.csv")
    assert [location for location, _ in error.problems] == ["row 2", "row 4"]
    assert error.problems[1][1].startswith("malformed CSV: unexpected end of data")


def test_a_whole_file_problem_is_reported_alone():
    error = rejected(b"\n\n", "empty.jsonl")
    assert error.problems == ((error.location, error.reason),) and error.location == ""
    assert error.reason.startswith("no examples found")


# ---------------------------------------------------------------- the page and the API


@pytest.mark.django_db
def test_the_upload_page_lists_every_problem_and_stores_nothing(client, owner, media):
    client.force_login(owner)
    bad = list(range(3, 3 + 24))  # 24 bad lines: 20 listed, 4 more
    data = with_bad_lines(bad, 30)
    response = client.post(reverse("datasets:upload"),
                           {"file": SimpleUploadedFile("notes.jsonl", data), "name": ""})
    assert response.status_code == 400
    page = response.content.decode()
    for number in bad[:20]:
        assert escape(f"notes.jsonl: line {number}: invalid JSON") in page
    assert f"notes.jsonl: line {bad[20]}:" not in page
    assert "and 4 more problems (only the first 20 are listed)" in page
    assert not Dataset.objects.exists()
    assert stored_files(media) == []


@pytest.mark.django_db
def test_the_api_returns_every_problem_as_a_list_and_stores_nothing(owner, media):
    api = APIClient()
    api.force_authenticate(owner)
    data = jsonl({"text": ""}, GOOD, {"text": None}, {"messages": []})
    response = api.post("/api/datasets/", {"file": SimpleUploadedFile("api.jsonl", data)}, format="multipart")
    assert response.status_code == 400
    assert response.json() == {"file": [
        'api.jsonl: line 1: "text" is empty',
        'api.jsonl: line 3: "text" must be a string, got null',
        'api.jsonl: line 4: "messages" is an empty list',
    ]}
    assert not Dataset.objects.exists()
    assert stored_files(media) == []
