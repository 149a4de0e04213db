"""Dataset pages and API: upload and validation, statistics and preview, isolation, delete."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest
from django.core.exceptions import ValidationError
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from django.utils.html import escape
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient
from transformers import AutoTokenizer

from splitcore.data.examples import NO_CHAT_TEMPLATE, preview_segments, token_stats, tokenize_examples
from splitcore.data.formats import parse_dataset
from webapp import base_models
from webapp.datasets import services
from webapp.datasets.models import Dataset

MODEL_ID = "tiny-llama"
API_LIST = "/api/datasets/"

PROMPT_COMPLETION = (
    b'{"prompt": "Question: What is the capital of France?", "completion": " Paris."}\n'
    b'{"prompt": "Numbers:", "completion": " 0 1 2 3 4 5 6 7 8 9 10 100 1000"}\n'
    b'{"prompt": "", "completion": "The quick brown fox jumps over the lazy dog."}\n'
    b'{"prompt": "user:", "completion": " hello, how are you today?"}\n'
)
CHAT = json.dumps({"messages": [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]}).encode() + b"\n"


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(autouse=True)
def media(settings, tmp_path) -> Path:
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.MEDIA_ROOT.mkdir()
    return settings.MEDIA_ROOT


@pytest.fixture(autouse=True)
def models_dir(settings, tmp_path, tiny_dirs) -> Path:
    directory = tmp_path / "models"
    directory.mkdir()
    (directory / MODEL_ID).symlink_to(tiny_dirs["llama"], target_is_directory=True)
    (directory / "not-a-model").mkdir()  # no config.json: not offered
    settings.MODELS_DIR = directory
    settings.DEFAULT_BASE_MODEL = MODEL_ID
    return directory


@pytest.fixture
def tokenizer(tiny_dirs):
    return AutoTokenizer.from_pretrained(tiny_dirs["llama"])


@pytest.fixture
def no_template_model(models_dir, tiny_dirs) -> str:
    """The tiny model installed once more as "no-template", without its chat template."""
    plain = models_dir / "no-template"
    plain.mkdir()
    for source in tiny_dirs["llama"].iterdir():
        if source.name != "chat_template.jinja":
            (plain / source.name).symlink_to(source)
    assert not AutoTokenizer.from_pretrained(plain).chat_template
    return plain.name


@pytest.fixture
def owner(django_user_model):
    return django_user_model.objects.create_user("owner")


@pytest.fixture
def other(django_user_model):
    return django_user_model.objects.create_user("other")


@pytest.fixture
def owner_client(client, owner):
    client.force_login(owner)
    return client


@pytest.fixture
def owner_api(owner) -> APIClient:
    api = APIClient()
    api.force_authenticate(owner)
    return api


def upload(filename: str, data: bytes) -> SimpleUploadedFile:
    return SimpleUploadedFile(filename, data, content_type="application/octet-stream")


def make_dataset(user, filename: str = "qa.jsonl", data: bytes = PROMPT_COMPLETION, name: str = "") -> Dataset:
    return services.create_dataset(user, upload(filename, data), name)


def stored_files(media: Path) -> list[Path]:
    return [path for path in media.rglob("*") if path.is_file()]


def page_upload(client, filename: str, data: bytes, name: str = ""):
    return client.post(reverse("datasets:upload"), {"file": upload(filename, data), "name": name})


def api_upload(api: APIClient, filename: str, data: bytes, name: str | None = None):
    payload = {"file": upload(filename, data)}
    if name is not None:
        payload["name"] = name
    return api.post(API_LIST, payload, format="multipart")


# ---------------------------------------------------------------- rejected uploads


def xlsx_like() -> bytes:
    """A ZIP archive holding what an .xlsx workbook holds first."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("[Content_Types].xml", '<?xml version="1.0" encoding="UTF-8"?><Types/>')
        archive.writestr("xl/worksheets/sheet1.xml", "<worksheet/>")
    return buffer.getvalue()


BAD_FILES = {
    "bad extension": ("data.xlsx", b"text\nhello\n", "data.xlsx: unsupported file type (the extension '.xlsx')"),
    "invalid JSON": ("bad.jsonl", b'{"text": "fine"}\n{"text": "broken\n', "bad.jsonl: line 2: invalid JSON"),
    "missing CSV column": ("qa.csv", b"prompt,answer\nhi,there\n", "qa.csv: row 1: missing column 'completion'"),
    "invalid UTF-8": ("latin.txt", "caf\u00e9 au lait\n".encode("latin-1"), "latin.txt: line 1: not valid UTF-8"),
    "UTF-16 text": (
        "unicode.csv", "prompt,completion\nBonjour?,Salut.\n".encode("utf-16"),
        'unicode.csv: the file is UTF-16 text; save it as UTF-8 (for example in Excel choose Save As > "CSV UTF-8"',
    ),
    "Excel workbook": (
        "sheet.csv", xlsx_like(),
        "sheet.csv: this is a binary file (it looks like a ZIP archive or an Excel .xlsx workbook), not text: "
        "upload JSONL, CSV or plain text saved as UTF-8",
    ),
    "empty file": ("empty.jsonl", b"", "empty.jsonl: no examples found"),
    "mixed kinds": (
        "mixed.jsonl",
        b'{"text": "a text row"}\n{"prompt": "p", "completion": "c"}\n',
        "mixed.jsonl: line 2: this row is prompt/completion but line 1 is text",
    ),
}


@pytest.mark.django_db
@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_page_rejects_bad_file_and_stores_nothing(owner_client, media, case):
    filename, data, message = BAD_FILES[case]
    response = page_upload(owner_client, filename, data)
    assert response.status_code == 400
    assert escape(message) in response.content.decode()
    assert 'class="errorlist' in response.content.decode()
    assert not Dataset.objects.exists()
    assert stored_files(media) == []


@pytest.mark.django_db
@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_api_rejects_bad_file_and_stores_nothing(owner_api, media, case):
    filename, data, message = BAD_FILES[case]
    response = api_upload(owner_api, filename, data)
    assert response.status_code == 400
    assert list(response.json()) == ["file"]
    assert message in response.json()["file"][0]
    assert not Dataset.objects.exists()
    assert stored_files(media) == []


@pytest.mark.django_db
def test_too_large_upload_is_rejected_on_page_and_api(settings, owner_client, owner_api, media):
    settings.DATASET_MAX_UPLOAD_BYTES = 64
    data = b'{"text": "%s"}\n' % (b"x" * 100)
    message = f"big.jsonl: the file is {len(data)} bytes, over the upload limit of 64 bytes"

    response = page_upload(owner_client, "big.jsonl", data)
    assert response.status_code == 400
    assert escape(message) in response.content.decode()

    response = api_upload(owner_api, "big.jsonl", data)
    assert response.status_code == 400
    assert message in response.json()["file"][0]
    assert not Dataset.objects.exists()
    assert stored_files(media) == []


@pytest.mark.django_db
def test_size_limit_message_is_in_mebibytes(settings, owner):
    settings.DATASET_MAX_UPLOAD_BYTES = 50 * 1024 * 1024

    class Declared:  # the size is checked before anything is read
        name = "huge.jsonl"
        size = 60 * 1024 * 1024

        def chunks(self):
            raise AssertionError("an oversized upload must not be read")

    with pytest.raises(ValidationError) as caught:
        services.create_dataset(owner, Declared())
    assert caught.value.message_dict == {
        "file": ["huge.jsonl: the file is 60 MiB, over the upload limit of 50 MiB; split it into smaller files"]
    }


@pytest.mark.django_db
def test_failure_after_the_file_was_written_leaves_no_file(owner, media, monkeypatch):
    def broken_save(self, *args, **kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(Dataset, "save", broken_save)
    with pytest.raises(RuntimeError, match="database went away"):
        make_dataset(owner)
    assert stored_files(media) == []
    assert not Dataset.objects.exists()


# ---------------------------------------------------------------- accepted uploads

GOOD_FILES = {
    "JSONL with BOM and CRLF": (
        "notes.jsonl",
        b"\xef\xbb\xbf" + b'{"text": "first"}\r\n{"text": "second"}\r\n\r\n{"text": "third"}\r\n',
        "jsonl", "text", 3,
    ),
    "quoted CSV with commas, newlines and non-ASCII": (
        "faq.csv",
        '\ufeffprompt,completion\r\n"Hello, world?","Line one\r\nline two, still the same field"\r\n'
        '"\u00bfQu\u00e9 tal?","Muy bien, gracias \u2014 \u65e5\u672c\u8a9e"\r\n'.encode(),
        "csv", "prompt_completion", 2,
    ),
    "text blocks with CRLF": (
        "book.txt", "Chapter one.\r\nIt begins.\r\n\r\n\r\nChapter two: na\u00efve caf\u00e9.\r\n".encode(),
        "txt", "text", 2,
    ),
    "chat messages": ("chat.ndjson", CHAT * 2, "jsonl", "messages", 2),
}


@pytest.mark.django_db
@pytest.mark.parametrize("case", GOOD_FILES, ids=list(GOOD_FILES))
def test_good_files_are_accepted(owner_client, owner, media, case):
    filename, data, file_format, kind, count = GOOD_FILES[case]
    response = page_upload(owner_client, filename, data)
    dataset = Dataset.objects.get()
    assert response.status_code == 302
    assert response["Location"] == reverse("datasets:detail", args=[dataset.pk])
    assert (dataset.owner, dataset.original_filename, dataset.file_format, dataset.kind) == (
        owner, filename, file_format, kind)
    assert dataset.num_examples == count
    assert dataset.name == Path(filename).stem
    assert dataset.size_bytes == len(data)
    assert dataset.sha256 == hashlib.sha256(data).hexdigest()
    files = stored_files(media)
    assert files == [media / dataset.file.name]
    assert files[0].read_bytes() == data
    assert files[0].parent.name == str(owner.pk) and files[0].suffix == f".{file_format}"

    page = owner_client.get(response["Location"]).content.decode()
    assert f"Uploaded {escape(dataset.name)}: {count} examples." in page


@pytest.mark.django_db
def test_client_paths_and_control_characters_leave_the_file_name(owner):
    dataset = make_dataset(owner, "C:\\Users\\me\\../notes\x00\x07.txt", b"hello\n")
    assert dataset.original_filename == "notes.txt"
    assert dataset.name == "notes"


@pytest.mark.django_db
def test_name_is_stripped_and_capped(owner):
    dataset = make_dataset(owner, name="  " + "n" * 250 + "  ")
    assert dataset.name == "n" * 200
    assert make_dataset(owner, name="   ").name == "qa"


# ---------------------------------------------------------------- statistics and preview


def expected_stats(tokenizer, data: bytes, filename: str, max_length: int):
    examples = parse_dataset(data, filename).examples
    return token_stats(tokenize_examples(tokenizer, examples, max_length), max_length)


@pytest.mark.django_db
def test_detail_shows_facts_statistics_and_marked_preview(owner_client, owner, tokenizer):
    dataset = make_dataset(owner, name="Capitals")
    response = owner_client.get(reverse("datasets:detail", args=[dataset.pk]))
    assert response.status_code == 200
    page = response.content.decode()
    for fact in ("Capitals", "qa.jsonl", "JSONL", "prompt / completion", dataset.sha256):
        assert escape(fact) in page

    stats = expected_stats(tokenizer, PROMPT_COMPLETION, "qa.jsonl", 512)
    assert response.context["stats"] == stats
    assert stats.truncated == 0
    cells = [stats.examples, stats.min_tokens, stats.median_tokens, stats.max_tokens, stats.total_tokens,
             stats.trained_tokens, stats.truncated]
    table = page[page.index('<table class="stats">'):]
    table = table[: table.index("</table>")]
    assert [cell.split("</td>")[0] for cell in table.split("<td>")[1:]] == [f"{value:g}" for value in cells]
    dataset.refresh_from_db()
    assert dataset.stats_cache[f"{MODEL_ID}|512"]["total_tokens"] == stats.total_tokens

    # The first three examples as they train: a user turn (the prompt) and an assistant turn (the completion,
    # marked as trained with the end of its turn), in the model's chat template.
    examples = parse_dataset(PROMPT_COMPLETION, "qa.jsonl").examples[:3]
    previews = [preview_segments(tokenizer, t) for t in tokenize_examples(tokenizer, examples, 512)]
    assert response.context["preview"] == previews
    assert page.count('<pre class="example">') == 3
    first = "".join(
        f'<mark class="trained">{escape(text)}</mark>' if trained else escape(text) for text, trained in previews[0]
    )
    assert f'<pre class="example">{first}</pre>' in page
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Question: What is the capital of France?"},
                                              {"role": "assistant", "content": " Paris."}], tokenize=False)
    assert "".join(text for text, _ in previews[0]) == rendered
    assert previews[0] == [("<|im_start|>user\nQuestion: What is the capital of France?<|im_end|>\n"
                            "<|im_start|>assistant\n", False), (" Paris.<|im_end|>\n", True)]
    assert '<mark class="trained"> Paris.&lt;|im_end|&gt;\n</mark>' in page
    assert "&lt;|endoftext|&gt;" not in page
    assert response.context["chat_format"] is True
    assert escape(f"Prompt/completion rows train in the chat template of {MODEL_ID} (as a user turn and an "
                  "assistant turn); the playground asks an adapter trained on them in the same format.") in page
    assert "joined" not in page


@pytest.mark.django_db
def test_statistics_count_truncation_at_the_chosen_length(owner_client, owner, tokenizer):
    dataset = make_dataset(owner)
    stats = expected_stats(tokenizer, PROMPT_COMPLETION, "qa.jsonl", 28)
    assert 0 < stats.truncated < stats.examples
    response = owner_client.get(reverse("datasets:detail", args=[dataset.pk]), {"model": MODEL_ID, "max_length": 28})
    assert response.status_code == 200
    assert response.context["stats"] == stats
    assert "Truncated at 28</th>" in response.content.decode()
    assert f"<td>{stats.truncated}</td>" in response.content.decode()
    dataset.refresh_from_db()
    assert set(dataset.stats_cache) == {f"{MODEL_ID}|28"}
    # Later requests are answered from the cache.
    dataset.file.delete(save=False)
    assert services.dataset_statistics(dataset, MODEL_ID, 28) == stats


@pytest.mark.django_db
def test_without_a_chat_template_prompt_and_completion_are_shown_joined(owner_client, owner, no_template_model):
    dataset = make_dataset(owner)
    response = owner_client.get(reverse("datasets:detail", args=[dataset.pk]), {"model": no_template_model})
    assert response.status_code == 200
    page = response.content.decode()
    assert response.context["chat_format"] is False
    assert response.context["preview"][0] == [("Question: What is the capital of France?", False),
                                              (" Paris.<|endoftext|>", True)]
    assert '<pre class="example">Question: What is the capital of France?<mark class="trained"> Paris.' in page
    assert "&lt;|im_start|&gt;" not in page
    assert escape("Prompt/completion rows train as plain text, prompt and completion joined (no-template has no "
                  "chat template); the playground asks an adapter trained on them in the same format.") in page


@pytest.mark.django_db
@pytest.mark.parametrize("filename,data,sentence", [
    ("chat.jsonl", CHAT, f"Chat rows train in the chat template of {MODEL_ID}; the playground asks an adapter "
                         "trained on them in the same format."),
    ("notes.txt", b"Split learning keeps the data with its owner.\n", "Text rows train as plain text."),
])
def test_detail_says_how_chat_and_text_rows_train(owner_client, owner, filename, data, sentence):
    dataset = make_dataset(owner, filename, data)
    page = owner_client.get(reverse("datasets:detail", args=[dataset.pk])).content.decode()
    assert escape(sentence) in page
    assert page.count('<p class="train-format">') == 1
    assert "Prompt/completion rows" not in page


@pytest.mark.django_db
def test_chat_preview_marks_only_the_assistant_turn(owner_client, owner):
    dataset = make_dataset(owner, "chat.jsonl", CHAT)
    page = owner_client.get(reverse("datasets:detail", args=[dataset.pk])).content.decode()
    marked = [part.split("</mark>")[0] for part in page.split('<mark class="trained">')[2:]]
    assert marked == ["Paris.&lt;|im_end|&gt;\n"]
    assert "&lt;|im_start|&gt;user\nWhat is the capital of France?" in page


@pytest.mark.django_db
def test_chat_rows_with_a_model_without_chat_template_show_the_reason(owner_client, owner, no_template_model):
    dataset = make_dataset(owner, "chat.jsonl", CHAT)
    response = owner_client.get(reverse("datasets:detail", args=[dataset.pk]), {"model": no_template_model})
    assert response.status_code == 200
    assert response.context["stats"] is None
    assert escape(f"Cannot tokenize this dataset with no-template: {NO_CHAT_TEMPLATE}") in response.content.decode()
    assert 'class="train-format"' not in response.content.decode()


@pytest.mark.django_db
def test_a_count_that_failed_in_the_background_is_kept_and_shown(owner_client, owner, no_template_model):
    from webapp.datasets.tasks import count_statistics

    dataset = make_dataset(owner, "chat.jsonl", CHAT)
    assert count_statistics(dataset.pk, no_template_model, 64) == "failed"
    dataset.refresh_from_db()
    assert dataset.stats_cache == {f"{no_template_model}|64": {"error": NO_CHAT_TEMPLATE}}
    with pytest.raises(ValueError, match="chat template"):
        services.page_statistics(dataset, no_template_model, 64)
    response = owner_client.get(reverse("datasets:detail", args=[dataset.pk]),
                                {"model": no_template_model, "max_length": 64})
    assert escape(f"Cannot tokenize this dataset with no-template: {NO_CHAT_TEMPLATE}") in response.content.decode()
    assert count_statistics(dataset.pk + 1000, no_template_model, 64) == "gone"


@pytest.mark.django_db
def test_missing_stored_file_is_reported_on_the_page(owner_client, owner):
    dataset = make_dataset(owner)
    dataset.file.delete(save=False)
    response = owner_client.get(reverse("datasets:detail", args=[dataset.pk]))
    assert response.status_code == 200
    assert "the stored file of this dataset is missing" in response.content.decode()


@pytest.mark.django_db
@pytest.mark.parametrize("query", [{"max_length": 1}, {"max_length": 40000}, {"max_length": "many"},
                                   {"model": "../etc"}, {"model": "not-a-model"}])
def test_bad_statistics_choices_are_form_errors(owner_client, owner, query):
    dataset = make_dataset(owner)
    response = owner_client.get(reverse("datasets:detail", args=[dataset.pk]), query)
    assert response.status_code == 400
    assert response.context["stats"] is None
    assert 'class="errorlist' in response.content.decode()


@pytest.mark.django_db
def test_base_models_are_directories_with_a_config(owner, models_dir):
    assert base_models.installed_models() == [MODEL_ID]
    dataset = make_dataset(owner)
    for model_id in ("..", "../models/tiny-llama", str(models_dir / MODEL_ID), "not-a-model", "missing", ""):
        with pytest.raises(base_models.BaseModelUnavailable):
            services.dataset_statistics(dataset, model_id, 64)
        with pytest.raises(base_models.BaseModelUnavailable):
            services.dataset_preview(dataset, model_id, 64)


@pytest.mark.django_db
def test_detail_without_base_models_still_shows_the_facts(settings, owner_client, owner, tmp_path):
    settings.MODELS_DIR = tmp_path / "no-models"
    dataset = make_dataset(owner)
    response = owner_client.get(reverse("datasets:detail", args=[dataset.pk]))
    assert response.status_code == 200
    assert "No base model is installed" in response.content.decode()


# ---------------------------------------------------------------- escaping


@pytest.mark.django_db
def test_names_and_content_are_escaped(owner_client, owner):
    script = "<script>alert(1)</script>"
    data = json.dumps({"text": f"<b>bold</b> {script}"}).encode() + b"\n"
    dataset = make_dataset(owner, "<img src=x onerror=alert(2)>.jsonl", data, name=script)

    for url in (reverse("datasets:list"), reverse("datasets:detail", args=[dataset.pk]),
                reverse("datasets:delete", args=[dataset.pk])):
        page = owner_client.get(url).content.decode()
        assert script not in page
        assert "<img src=x" not in page
        assert escape(script) in page
    page = owner_client.get(reverse("datasets:detail", args=[dataset.pk])).content.decode()
    assert "<b>bold</b>" not in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page


# ---------------------------------------------------------------- ownership


@pytest.mark.django_db
def test_other_users_get_404_and_the_dataset_survives(client, owner, other, media, django_capture_on_commit_callbacks):
    dataset = make_dataset(owner)
    client.force_login(other)
    with django_capture_on_commit_callbacks(execute=True):
        assert client.get(reverse("datasets:detail", args=[dataset.pk])).status_code == 404
        assert client.get(reverse("datasets:delete", args=[dataset.pk])).status_code == 404
        assert client.post(reverse("datasets:delete", args=[dataset.pk])).status_code == 404

    api = APIClient()
    api.force_authenticate(other)
    with django_capture_on_commit_callbacks(execute=True):
        assert api.get(f"{API_LIST}{dataset.pk}/").status_code == 404
        assert api.delete(f"{API_LIST}{dataset.pk}/").status_code == 404

    assert Dataset.objects.filter(pk=dataset.pk).exists()
    assert (media / dataset.file.name).is_file()


@pytest.mark.django_db
def test_lists_show_only_own_datasets(owner_client, owner_api, owner, other):
    mine = make_dataset(owner, name="mine-dataset")
    theirs = make_dataset(other, name="theirs-dataset")

    page = owner_client.get(reverse("datasets:list")).content.decode()
    assert "mine-dataset" in page and "theirs-dataset" not in page
    assert reverse("datasets:detail", args=[theirs.pk]) not in page

    body = owner_api.get(API_LIST).json()
    assert [row["id"] for row in body["results"]] == [mine.pk]
    assert body["count"] == 1


@pytest.mark.django_db
def test_anonymous_users_are_sent_to_login_or_refused(client, owner):
    dataset = make_dataset(owner)
    login = reverse("login")
    for response in (
        client.get(reverse("datasets:list")),
        client.post(reverse("datasets:upload"), {"file": upload("a.txt", b"hello\n")}),
        client.get(reverse("datasets:detail", args=[dataset.pk])),
        client.get(reverse("datasets:delete", args=[dataset.pk])),
        client.post(reverse("datasets:delete", args=[dataset.pk])),
    ):
        assert response.status_code == 302
        assert response["Location"].startswith(login + "?next=")

    api = APIClient()
    assert api.get(API_LIST).status_code in (401, 403)
    assert api.get(f"{API_LIST}{dataset.pk}/").status_code in (401, 403)
    assert api.delete(f"{API_LIST}{dataset.pk}/").status_code in (401, 403)
    assert api_upload(api, "a.txt", b"hello\n").status_code in (401, 403)
    assert Dataset.objects.count() == 1


# ---------------------------------------------------------------- delete


@pytest.mark.django_db
def test_delete_page_confirms_then_removes_row_and_file(owner_client, owner, media, django_capture_on_commit_callbacks):
    dataset = make_dataset(owner, name="to-delete")
    url = reverse("datasets:delete", args=[dataset.pk])
    confirm = owner_client.get(url)
    assert confirm.status_code == 200
    assert "Delete to-delete?" in confirm.content.decode()
    assert 'name="csrfmiddlewaretoken"' in confirm.content.decode()
    assert Dataset.objects.exists() and stored_files(media)

    with django_capture_on_commit_callbacks(execute=True):
        response = owner_client.post(url)
    assert response.status_code == 302
    assert response["Location"] == reverse("datasets:list")
    assert not Dataset.objects.exists()
    assert stored_files(media) == []


@pytest.mark.django_db
def test_delete_requires_a_csrf_token(owner, media):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)
    dataset = make_dataset(owner)
    assert client.post(reverse("datasets:delete", args=[dataset.pk])).status_code == 403
    assert Dataset.objects.filter(pk=dataset.pk).exists()


# ---------------------------------------------------------------- API


@pytest.mark.django_db
def test_api_upload_show_and_delete_with_a_token(owner, media, django_capture_on_commit_callbacks):
    token = Token.objects.create(user=owner)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")

    created = api_upload(api, "qa.jsonl", PROMPT_COMPLETION, name="  Capitals  ")
    assert created.status_code == 201, created.content
    body = created.json()
    dataset = Dataset.objects.get()
    assert set(body) == {"id", "name", "original_filename", "file_format", "kind", "num_examples", "size_bytes",
                         "sha256", "created_at"}
    assert body["id"] == dataset.pk and dataset.owner == owner
    assert (body["name"], body["original_filename"], body["file_format"], body["kind"], body["num_examples"]) == (
        "Capitals", "qa.jsonl", "jsonl", "prompt_completion", 4)
    assert body["size_bytes"] == len(PROMPT_COMPLETION)
    assert body["sha256"] == hashlib.sha256(PROMPT_COMPLETION).hexdigest()
    assert dataset.file.name not in created.content.decode()

    shown = api.get(f"{API_LIST}{dataset.pk}/")
    assert shown.status_code == 200 and shown.json() == body
    assert api.get(API_LIST).json()["results"] == [body]

    with django_capture_on_commit_callbacks(execute=True):
        deleted = api.delete(f"{API_LIST}{dataset.pk}/")
    assert deleted.status_code == 204
    assert not Dataset.objects.exists()
    assert stored_files(media) == []
    assert api.get(f"{API_LIST}{dataset.pk}/").status_code == 404


@pytest.mark.django_db
def test_api_upload_without_a_file_is_a_field_error(owner_api):
    response = owner_api.post(API_LIST, {"name": "nothing"}, format="multipart")
    assert response.status_code == 400
    assert list(response.json()) == ["file"]
    assert not Dataset.objects.exists()


# ---------------------------------------------------------------- admin


@pytest.mark.django_db
def test_admin_lists_and_filters_datasets(client, django_user_model, owner):
    make_dataset(owner, name="admin-visible")
    admin_user = django_user_model.objects.create_superuser("admin", email="admin@example.com")
    client.force_login(admin_user)
    url = reverse("admin:datasets_dataset_changelist")
    assert "admin-visible" in client.get(url, {"kind__exact": "prompt_completion", "q": "qa"}).content.decode()
    assert "admin-visible" not in client.get(url, {"kind__exact": "text"}).content.decode()


# ---------------------------------------------------------------- from a dataset to a job


def dataset_select(page: str) -> str:
    """The job form's dataset <select>."""
    start = page.index('<select name="dataset"')
    return page[start:page.index("</select>", start)]


@pytest.mark.django_db
def test_train_button_and_list_link_open_the_job_form_with_the_dataset_chosen(owner_client, owner, other):
    older = make_dataset(owner, name="older")
    chosen = make_dataset(owner, name="chosen")
    make_dataset(owner, name="newest")
    new_job = f"{reverse('training:job-new')}?dataset={chosen.pk}"
    assert new_job == f"/jobs/new/?dataset={chosen.pk}"

    detail = owner_client.get(reverse("datasets:detail", args=[chosen.pk])).content.decode()
    assert f'<a class="button" href="{new_job}">Train on this dataset</a>' in detail
    listing = owner_client.get(reverse("datasets:list")).content.decode()
    for dataset in Dataset.objects.filter(owner=owner):
        assert f'<a href="/jobs/new/?dataset={dataset.pk}">Train on it</a>' in listing

    response = owner_client.get(new_job)
    assert response.status_code == 200
    select = dataset_select(response.content.decode())
    assert f'<option value="{chosen.pk}" selected>' in select
    assert f'<option value="{older.pk}">' in select
    assert select.count(" selected") == 1

    # Someone else's dataset is neither chosen nor shown.
    theirs = make_dataset(other, name="theirs-dataset")
    page = owner_client.get(f"/jobs/new/?dataset={theirs.pk}").content.decode()
    assert "theirs-dataset" not in page
    assert f'value="{theirs.pk}" selected' not in dataset_select(page)


@pytest.mark.django_db
def test_empty_job_list_offers_the_newest_dataset_or_an_upload(owner_client, owner, other):
    upload_first = f'No jobs yet. <a href="{reverse("datasets:list")}">Upload a dataset</a>, then start a job.'
    page = owner_client.get(reverse("training:job-list")).content.decode()
    assert upload_first in page
    assert "Start a job on" not in page

    make_dataset(other, name="theirs-dataset")  # another user's datasets do not count
    page = owner_client.get(reverse("training:job-list")).content.decode()
    assert upload_first in page and "theirs-dataset" not in page

    make_dataset(owner, name="Lighthouse keeper (demo)")
    newest = make_dataset(owner, name="Capitals <v2>")
    for response in (owner_client.get(reverse("training:job-list")), owner_client.get("/", follow=True)):
        page = response.content.decode()
        assert response.status_code == 200
        assert (f'No jobs yet. <a href="/jobs/new/?dataset={newest.pk}">Start a job on {escape(newest.name)}</a>,'
                in page)
        assert f'or <a href="{reverse("datasets:list")}">upload a dataset</a> of your own first.' in page
        assert upload_first not in page
