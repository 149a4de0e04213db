"""Datasets: accept an upload, delete it, and describe it with a base model's tokenizer.

No HTTP here: the pages and the API both call these functions. A rejected upload raises
``django.core.exceptions.ValidationError({"file": [message]})`` and leaves nothing behind
(no row, no file).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import PurePath

from celery import signature
from django.conf import settings
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.core.files.base import ContentFile
from django.db import transaction

from splitcore.data.examples import TokenStats, preview_segments, token_stats, tokenize_examples, uses_chat_template
from splitcore.data.formats import DatasetFormatError, ParsedDataset, parse_dataset

from .. import base_models, storage
from ..byte_sizes import format_bytes
from ..training.models import Job
from .models import Dataset

NAME_MAX_LENGTH = Dataset._meta.get_field("name").max_length
ORIGINAL_FILENAME_MAX_LENGTH = Dataset._meta.get_field("original_filename").max_length
MIN_MAX_LENGTH = 2  # one token to read, one to predict
MAX_MAX_LENGTH = 32768
DEFAULT_MAX_LENGTH = 512
PREVIEW_EXAMPLES = 3
# Token statistics kept per dataset; the oldest (model, max length) pair is dropped first.
STATS_CACHE_ENTRIES = 32
# Statistics of a dataset up to this many examples are counted in the request (milliseconds); those of a
# larger one once, by a worker (the control queue), and read from the dataset's cache after that.
INLINE_STATISTICS_EXAMPLES = 2000
# The name tasks.py registers the count under (sent by name: this module does not import tasks.py).
COUNT_STATISTICS_TASK = "datasets.count_statistics"
# A count asked for is not asked for again within this many seconds (a page reloading while it runs).
STATISTICS_REQUEST_S = 300

log = logging.getLogger(__name__)

Segments = list[tuple[str, bool]]


# ---------------------------------------------------------------- upload and delete


def create_dataset(owner, uploaded_file, name: str = "") -> Dataset:
    """Validate an uploaded file and store it as a dataset of ``owner``.

    ``uploaded_file`` is a Django ``UploadedFile`` (or anything with ``name``, ``size``
    and ``chunks()``). The size is checked before a byte is read.
    """
    original_filename = _original_filename(uploaded_file.name)
    _check_quota(owner)
    _check_size(original_filename, uploaded_file.size)
    data = b"".join(uploaded_file.chunks())
    _check_size(original_filename, len(data))  # the declared size is the client's word
    storage.check_room(owner, len(data), original_filename)
    try:
        parsed = parse_dataset(data, original_filename)
    except DatasetFormatError as exc:
        # One message per problem (up to MAX_REPORTED_PROBLEMS, each with its line), then how many more.
        raise ValidationError({"file": exc.messages()}) from exc

    dataset = Dataset(
        owner=owner,
        name=_dataset_name(name, original_filename),
        original_filename=original_filename,
        file_format=parsed.file_format,
        kind=parsed.kind,
        num_examples=len(parsed.examples),
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    try:
        with transaction.atomic():
            # The storage name comes from Dataset.file's upload_to, never from the user.
            dataset.file.save(f"upload.{parsed.file_format}", ContentFile(data), save=False)
            dataset.save()
    except BaseException:
        _delete_file(dataset)
        raise
    if dataset.num_examples > INLINE_STATISTICS_EXAMPLES and base_models.default_model_id():
        request_statistics(dataset, base_models.default_model_id(), DEFAULT_MAX_LENGTH)
    return dataset


def _check_quota(owner) -> None:
    limit = settings.MAX_DATASETS_PER_USER
    if limit and Dataset.objects.filter(owner=owner).count() >= limit:
        raise ValidationError({"file": [f"you already store {limit} datasets, the limit per user; "
                                        "delete one you no longer need to upload another"]})


class DatasetInUse(Exception):
    """The dataset is read by a job that is queued or running; the message says which."""


def delete_dataset(dataset: Dataset) -> None:
    """Delete the row, then its file once the deletion is committed. Refused (DatasetInUse) while a queued or
    running job uses it; the jobs that trained on it keep their records and say the dataset is gone."""
    file_storage, file_name = dataset.file.storage, dataset.file.name
    with transaction.atomic():
        active = list(Job.objects.select_for_update().filter(
            dataset=dataset, status__in=[Job.Status.QUEUED, Job.Status.RUNNING]).values_list("pk", flat=True))
        if active:
            jobs = ", ".join(f"job {pk}" for pk in active)
            raise DatasetInUse(f"{dataset.name} is used by {jobs}, which {'is' if len(active) == 1 else 'are'} "
                               "queued or running; cancel or wait for it to finish, then delete the dataset")
        dataset.delete()
        if file_name:
            transaction.on_commit(lambda: file_storage.delete(file_name))


def _original_filename(raw_name: str | None) -> str:
    # Browsers send a bare name; some clients send a path. Keep the last part only.
    filename = PurePath((raw_name or "").replace("\\", "/")).name
    # Control characters (a NUL breaks PostgreSQL) have no place in a name shown on pages.
    filename = "".join(char for char in filename if char.isprintable()).strip()
    if not filename:
        raise ValidationError({"file": ["the upload has no file name; upload a .jsonl, .csv or .txt file"]})
    if len(filename) > ORIGINAL_FILENAME_MAX_LENGTH:
        # Keep the extension: it decides how the file is read.
        suffix = PurePath(filename).suffix[:16]
        filename = filename[: ORIGINAL_FILENAME_MAX_LENGTH - len(suffix)] + suffix
    return filename


def _check_size(filename: str, size: int) -> None:
    limit = settings.DATASET_MAX_UPLOAD_BYTES
    if size > limit:
        size_text, limit_text = _size_words(size), _size_words(limit)
        if size_text == limit_text:  # just over the limit: rounding would hide the difference
            size_text, limit_text = f"{size:,} bytes", f"{limit:,} bytes"
        raise ValidationError({"file": [
            f"{filename}: the file is {size_text}, over the upload limit of {limit_text}; split it into smaller files"
        ]})


def _size_words(size: int) -> str:
    """Binary units ("50 MiB", "54.5 MiB"), as the page's limit and the browser's check say; under 1 KiB
    the bytes."""
    return f"{size:,} bytes" if size < 1024 else format_bytes(size)


def _dataset_name(name: str | None, original_filename: str) -> str:
    name = (name or "").strip() or PurePath(original_filename).stem.strip() or "dataset"
    return name[:NAME_MAX_LENGTH].strip()


def _delete_file(dataset: Dataset) -> None:
    if dataset.file.name:
        dataset.file.storage.delete(dataset.file.name)


# ---------------------------------------------------------------- base models


# ---------------------------------------------------------------- statistics and preview


def dataset_statistics(dataset: Dataset, model_id: str, max_length: int) -> TokenStats:
    """Token counts of every example with ``model_id``'s tokenizer (cached on the dataset).

    Raises ``ValueError`` (``BaseModelUnavailable`` for an unknown model) with a message
    for the user, e.g. when chat rows meet a tokenizer without a chat template.
    """
    stats = cached_statistics(dataset, model_id, max_length)
    if stats is not None:
        return stats
    try:
        tokenizer = base_models.tokenizer(model_id)
        stats = token_stats(tokenize_examples(tokenizer, _parse(dataset).examples, max_length), max_length)
    except base_models.BaseModelUnavailable:
        raise
    except ValueError as exc:
        _remember(dataset, _stats_key(model_id, max_length), {"error": str(exc)})
        raise
    _remember(dataset, _stats_key(model_id, max_length), dataclasses.asdict(stats))
    return stats


def cached_statistics(dataset: Dataset, model_id: str, max_length: int) -> TokenStats | None:
    """The statistics counted before (None when they were not); ``ValueError`` when that count failed, or
    for an unknown model or a bad length."""
    _check_max_length(max_length)
    base_models.model_dir(model_id)  # an unknown model is an error even when statistics were cached for it
    cached = (dataset.stats_cache or {}).get(_stats_key(model_id, max_length))
    if cached is None:
        return None
    if "error" in cached:
        raise ValueError(cached["error"])
    try:
        return TokenStats(**cached)
    except TypeError:
        return None  # written with other fields: count again


def page_statistics(dataset: Dataset, model_id: str, max_length: int) -> TokenStats | None:
    """The statistics a page shows: counted before, or counted now for a small dataset; None while a
    worker counts those of a large one (asked for here, once)."""
    stats = cached_statistics(dataset, model_id, max_length)
    if stats is not None:
        return stats
    if dataset.num_examples <= INLINE_STATISTICS_EXAMPLES:
        return dataset_statistics(dataset, model_id, max_length)
    request_statistics(dataset, model_id, max_length)
    return None


def request_statistics(dataset: Dataset, model_id: str, max_length: int) -> None:
    """Have a worker count the statistics (once the current transaction commits), unless that was asked
    for within STATISTICS_REQUEST_S."""
    try:
        first = cache.add(f"dataset-stats:{dataset.pk}:{_stats_key(model_id, max_length)}", 1,
                          STATISTICS_REQUEST_S)
    except Exception as exc:  # noqa: BLE001 - without the cache, ask anyway: a count twice is harmless
        log.warning("could not note the statistics request of dataset %s: %s", dataset.pk, exc)
        first = True
    if first:
        transaction.on_commit(lambda: signature(COUNT_STATISTICS_TASK, args=(dataset.pk, model_id, max_length)).delay())


def _stats_key(model_id: str, max_length: int) -> str:
    return f"{model_id}|{max_length}"


def dataset_preview(
    dataset: Dataset, model_id: str, max_length: int, count: int = PREVIEW_EXAMPLES
) -> list[Segments]:
    """The first ``count`` examples as the model reads them: runs of (text, trained)."""
    _check_max_length(max_length)
    tokenizer = base_models.tokenizer(model_id)
    examples = _parse(dataset).examples[:count]
    return [preview_segments(tokenizer, tokenized) for tokenized in tokenize_examples(tokenizer, examples, max_length)]


def trains_in_chat_template(dataset: Dataset, model_id: str) -> bool:
    """Whether the dataset's examples train through ``model_id``'s chat template (then an adapter trained
    on them is asked through it too); False means plain text."""
    return uses_chat_template(base_models.tokenizer(model_id), dataset.kind)


def _check_max_length(max_length: int) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise ValueError(f"max length must be a whole number, got {max_length!r}")
    if not MIN_MAX_LENGTH <= max_length <= MAX_MAX_LENGTH:
        raise ValueError(f"max length must be between {MIN_MAX_LENGTH} and {MAX_MAX_LENGTH}, got {max_length}")


def _parse(dataset: Dataset) -> ParsedDataset:
    try:
        with dataset.file.open("rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise ValueError("the stored file of this dataset is missing; delete the dataset and upload it again") from None
    return parse_dataset(data, dataset.original_filename)


def _remember(dataset: Dataset, key: str, value: dict) -> None:
    cache = {k: v for k, v in (dataset.stats_cache or {}).items() if k != key}
    cache[key] = value
    dataset.stats_cache = dict(list(cache.items())[-STATS_CACHE_ENTRIES:])
    Dataset.objects.filter(pk=dataset.pk).update(stats_cache=dataset.stats_cache)
