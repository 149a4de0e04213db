"""Uploaded dataset files (JSONL, CSV or plain text) parsed into training examples.

Every file holds one kind of example:

* text: ``{"text": ...}`` rows, a CSV ``text`` column, or blank-line-separated blocks
  of a ``.txt`` file; the loss covers the whole text.
* prompt/completion: ``{"prompt": ..., "completion": ...}`` rows or CSV columns; the
  loss covers the completion only (a user and an assistant turn of the model's chat
  template when it has one, see ``splitcore.data.examples``).
* messages: ``{"messages": [{"role": ..., "content": ...}, ...]}`` rows, rendered with
  the model's chat template; the loss covers the assistant turns only.

Files are UTF-8 (a BOM is fine); UTF-16/UTF-32 text and binary files (a spreadsheet, an
archive, a PDF) are named as such. A rejected file raises :class:`DatasetFormatError`,
which names the file, the line or row, and what to change: up to ``MAX_REPORTED_PROBLEMS`` problems of
separate lines or rows at once (and how many more there are), so that one upload shows what to fix.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

ExampleKind = Literal["text", "prompt_completion", "messages"]
FileFormat = Literal["jsonl", "csv", "txt"]

MAX_EXAMPLES = 1_000_000
# Problems of single lines or rows one rejection lists; the rest are counted ("and 3 more problems").
MAX_REPORTED_PROBLEMS = 20
# csv refuses fields over 128 KiB by default; a long document in one cell is normal here.
CSV_FIELD_SIZE_LIMIT = 16 * 1024 * 1024
CHAT_ROLES = ("system", "user", "assistant")

FILE_FORMATS: dict[str, FileFormat] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".txt": "txt"}

_KIND_LABELS: dict[str, str] = {"text": "text", "prompt_completion": "prompt/completion", "messages": "chat messages"}

SAVE_AS_TEXT = "upload JSONL, CSV or plain text saved as UTF-8"
# How to get UTF-8 out of the programs that write UTF-16 (Excel's "Unicode Text" is UTF-16, tab-separated).
_SAVE_AS_UTF8 = ('for example in Excel choose Save As > "CSV UTF-8", in Notepad choose Save As with Encoding '
                 '"UTF-8", or run iconv -f {encoding} -t UTF-8')
# Byte-order marks, longest first: the UTF-32 LE mark begins with the UTF-16 LE one.
_UNICODE_BOMS: tuple[tuple[bytes, str], ...] = (
    (codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"),
)
# Magic numbers of files people upload by mistake; checked only when the data is not UTF-8 text.
_BINARY_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", "a ZIP archive or an Excel .xlsx workbook"),
    (b"PK\x05\x06", "an empty ZIP archive"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an Excel .xls workbook or a Word .doc file"),
    (b"\x1f\x8b", "a gzip-compressed file"),
    (b"BZh", "a bzip2-compressed file"),
    (b"\xfd7zXZ\x00", "an xz-compressed file"),
    (b"\x28\xb5\x2f\xfd", "a Zstandard-compressed file"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"%PDF-", "a PDF document"),
    (b"PAR1", "a Parquet file"),
    (b"ARROW1", "an Arrow (Feather) file"),
    (b"SQLite format 3\x00", "an SQLite database"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
)
# Bytes looked at to recognise UTF-16 or UTF-32 text without a byte-order mark.
_ENCODING_SAMPLE = 64 * 1024

_FORMAT_HINTS: dict[str, str] = {
    "jsonl": 'a JSONL file needs one JSON object per line: {"text": ...}, {"prompt": ..., "completion": ...} '
    'or {"messages": [{"role": ..., "content": ...}, ...]}',
    "csv": "a CSV file needs a header row with a 'text' column, or 'prompt' and 'completion' columns, "
    "and then one row per example",
    "txt": "a text file needs one example per block of lines, with a blank line between blocks",
}


@dataclass(frozen=True)
class TextExample:
    text: str

    @property
    def kind(self) -> ExampleKind:
        return "text"


@dataclass(frozen=True)
class PromptCompletionExample:
    prompt: str
    completion: str

    @property
    def kind(self) -> ExampleKind:
        return "prompt_completion"


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class ChatExample:
    messages: tuple[ChatMessage, ...]

    @property
    def kind(self) -> ExampleKind:
        return "messages"


Example = Union[TextExample, PromptCompletionExample, ChatExample]


@dataclass(frozen=True)
class ParsedDataset:
    filename: str
    file_format: FileFormat
    kind: ExampleKind
    examples: tuple[Example, ...]


class DatasetFormatError(ValueError):
    """A rejected upload: ``location`` is e.g. "line 7" or "row 3", "" for the whole file.

    ``location`` and ``reason`` are the first problem; ``problems`` are all those listed, as (location,
    reason) pairs in file order (at most ``MAX_REPORTED_PROBLEMS``), and ``unreported`` counts the problems
    found beyond them. ``messages()`` says each on a line of its own; ``str()`` is those lines joined."""

    def __init__(self, filename: str, location: str, reason: str, *,
                 more_problems: tuple[tuple[str, str], ...] = (), unreported: int = 0) -> None:
        self.filename = filename
        self.location = location
        self.reason = reason
        self.problems = ((location, reason), *more_problems)
        self.unreported = unreported
        super().__init__("\n".join(self.messages()))

    def messages(self) -> list[str]:
        """One sentence per problem, each naming the file and the place, then "and N more problems"."""
        lines = [f"{self.filename}: {location}: {reason}" if location else f"{self.filename}: {reason}"
                 for location, reason in self.problems]
        if self.unreported:
            lines.append(f"and {self.unreported} more problem{'s' if self.unreported != 1 else ''} "
                         f"(only the first {len(self.problems)} are listed)")
        return lines


class _Invalid(Exception):
    """Raised by the parsers, which do not know the file name; becomes a DatasetFormatError.

    Raised, it ends the parsing (a problem of the whole file, or one after which nothing more can be
    read); yielded by a parser in place of an example, it is one line's or row's problem and the parsing
    goes on to count the others."""

    def __init__(self, location: str, reason: str) -> None:
        super().__init__(location, reason)
        self.location = location
        self.reason = reason


class _Problems:
    """The problems of single lines or rows found so far: the first MAX_REPORTED_PROBLEMS, and a count."""

    def __init__(self) -> None:
        self.listed: list[_Invalid] = []
        self.total = 0

    def add(self, problem: _Invalid) -> None:
        self.total += 1
        if len(self.listed) < MAX_REPORTED_PROBLEMS:
            self.listed.append(problem)

    def error(self, filename: str) -> DatasetFormatError:
        first, *rest = self.listed
        return DatasetFormatError(filename, first.location, first.reason,
                                  more_problems=tuple((p.location, p.reason) for p in rest),
                                  unreported=self.total - len(self.listed))


# (location, example), or (location, the problem of that line or row).
Located = Iterator[tuple[str, Union[Example, _Invalid]]]


def load_dataset_file(path: str | Path) -> ParsedDataset:
    path = Path(path)
    return parse_dataset(path.read_bytes(), path.name)


def parse_dataset(data: bytes, filename: str) -> ParsedDataset:
    """Parse an uploaded file; the extension of ``filename`` picks the format."""
    problems = _Problems()
    try:
        file_format = _file_format(filename)
        text = _decode_utf8(data)
        kind, examples = _collect(_PARSERS[file_format](text), file_format, problems)
    except _Invalid as problem:
        # Whatever was found before it is listed first: it is earlier in the file.
        problems.add(problem)
    if problems.total:
        raise problems.error(filename) from None
    return ParsedDataset(filename=filename, file_format=file_format, kind=kind, examples=examples)


def _file_format(filename: str) -> FileFormat:
    suffix = Path(filename).suffix.lower()
    if suffix in FILE_FORMATS:
        return FILE_FORMATS[suffix]
    found = f"the extension {suffix!r}" if suffix else "no extension"
    raise _Invalid("", f"unsupported file type ({found}); upload a .jsonl (or .ndjson), .csv or .txt file")


def _decode_utf8(data: bytes) -> str:
    """UTF-8 text with any BOM removed and CRLF line ends turned into LF.

    Data that is not UTF-8 text is explained when it can be: UTF-16 or UTF-32 text, or a
    binary file (by its magic number, or its NUL bytes)."""
    for bom, encoding in _UNICODE_BOMS:
        if data.startswith(bom):
            raise _Invalid("", _other_encoding(encoding))
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        _explain_non_text(data)
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        column = len(data[line_start:exc.start].decode("utf-8")) + 1
        raise _Invalid(
            f"line {line}",
            f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {column}); save the file as UTF-8",
        ) from None
    nul = text.find("\x00")
    if nul >= 0:
        _explain_non_text(data)
        line_start = text.rfind("\n", 0, nul) + 1
        line = text.count("\n", 0, nul) + 1
        raise _Invalid(
            f"line {line}",
            f"this looks like a binary file, not text (it has a NUL byte at column {nul - line_start + 1}): "
            f"{SAVE_AS_TEXT}",
        )
    return text.replace("\r\n", "\n")


def _explain_non_text(data: bytes) -> None:
    """Raise a whole-file rejection when ``data`` (not UTF-8 text) is recognisably a binary file or
    BOM-less UTF-16/UTF-32 text; return when it is neither."""
    for signature, description in _BINARY_SIGNATURES:
        if data.startswith(signature):
            raise _Invalid("", f"this is a binary file (it looks like {description}), not text: {SAVE_AS_TEXT}")
    encoding = _bomless_wide_encoding(data[:_ENCODING_SAMPLE])
    if encoding:
        raise _Invalid("", _other_encoding(encoding))


def _other_encoding(encoding: str) -> str:
    return f"the file is {encoding} text; save it as UTF-8 ({_SAVE_AS_UTF8.format(encoding=encoding)})"


def _bomless_wide_encoding(sample: bytes) -> str | None:
    """The encoding ("UTF-32" or "UTF-16") whose NUL bytes ``sample`` has, for text without a byte-order mark.

    Dataset files are full of characters below U+0100 (digits, spaces, punctuation, the syntax
    of JSON and CSV, Latin letters), whose high byte is NUL, while the low byte of a character
    is rarely NUL. So in UTF-16 one byte of each two is often NUL and the other almost never;
    in UTF-32 the two high bytes of each four are NUL for any character below U+10000."""
    for width, encoding, high_share in ((4, "UTF-32", 0.9), (2, "UTF-16", 0.3)):
        units = len(sample) // width
        if units < 4:
            continue
        nul_share = [sample[offset: units * width: width].count(0) / units for offset in range(width)]
        little, big = nul_share, nul_share[::-1]  # offset 0 is the low byte in little-endian order
        for shares in (little, big):
            always_nul = shares[2:] if width == 4 else shares[1:]
            if shares[0] <= 0.05 and min(always_nul) >= high_share:
                return encoding
    return None


def _collect(located: Located, file_format: FileFormat,
             problems: _Problems) -> tuple[ExampleKind, tuple[Example, ...]]:
    """Gather the examples, checking that the file holds one kind and not too many; the problems of single
    lines or rows go to ``problems``."""
    examples: list[Example] = []
    first_location = ""
    for location, example in located:
        if isinstance(example, _Invalid):
            problems.add(example)
            continue
        if not examples:
            first_location = location
        elif example.kind != examples[0].kind:
            problems.add(_Invalid(
                location,
                f"this row is {_KIND_LABELS[example.kind]} but {first_location} is "
                f"{_KIND_LABELS[examples[0].kind]}; use one format per file",
            ))
            continue
        examples.append(example)
        if len(examples) > MAX_EXAMPLES:
            raise _Invalid("", f"more than {MAX_EXAMPLES:,} examples; split the data into smaller files")
    if not examples and not problems.total:
        raise _Invalid("", f"no examples found; {_FORMAT_HINTS[file_format]}")
    return (examples[0].kind if examples else "text"), tuple(examples)


# --- JSONL ---------------------------------------------------------------------------

_JSON_SCHEMAS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
}


def _parse_jsonl(text: str) -> Located:
    _refuse_one_json_document(text)
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            location = f"line {number}"
            try:
                yield location, _example_from_json(_load_json_object(line, location), location)
            except _Invalid as problem:
                yield location, problem


def _refuse_one_json_document(text: str) -> None:
    """A pretty-printed JSON file (one array or object over many lines) is one problem of the whole file,
    not one per line that is not JSON on its own."""
    first = text.lstrip().split("\n", 1)[0].strip()
    if not first.startswith(("[", "{")) or text.strip() == first:
        return  # JSON Lines starts with a whole object on one line; a one-line file is read as such
    try:
        json.loads(first)
        return  # the first line is JSON on its own: this is JSON Lines, checked line by line
    except (ValueError, RecursionError):
        pass
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return  # not one document either: each line's problem says what is wrong
    lines = text.strip().count("\n") + 1
    raise _Invalid("", f"the file is one JSON document ({_json_type(value)}) over {lines:,} lines, not JSON Lines: write "
                       "each example as one JSON object on a line of its own (jq -c '.[]' data.json > "
                       "data.jsonl does it for an array)")


def _load_json_object(line: str, location: str) -> dict:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _Invalid(location, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise _Invalid(location, "invalid JSON: nested too deeply") from None
    except ValueError:
        # Python refuses to convert integers longer than sys.get_int_max_str_digits().
        raise _Invalid(location, f"invalid JSON: a number has more than {sys.get_int_max_str_digits()} digits; "
                                 "write it as a string") from None
    if not isinstance(value, dict):
        reason = f"expected a JSON object, got {_json_type(value)}"
        if isinstance(value, list):
            reason += "; JSONL needs one object per line, not one JSON array for the whole file"
        raise _Invalid(location, reason)
    return value


def _example_from_json(row: dict, location: str) -> Example:
    kinds = [kind for kind, fields in _JSON_SCHEMAS.items() if any(field in row for field in fields)]
    if len(kinds) > 1:
        present = " and ".join(json.dumps(field) for kind in kinds for field in _JSON_SCHEMAS[kind] if field in row)
        raise _Invalid(location, f"ambiguous row: it has {present}; use exactly one format per row")
    if not kinds:
        found = ", ".join(json.dumps(key) for key in row) or "none"
        raise _Invalid(location, f'no "text", "prompt"/"completion" or "messages" field (keys found: {found})')
    return _JSON_ROW_BUILDERS[kinds[0]](row, location)


def _text_row(row: dict, location: str) -> TextExample:
    return TextExample(_json_string(row, "text", location, allow_empty=False))


def _prompt_completion_row(row: dict, location: str) -> PromptCompletionExample:
    for field in ("prompt", "completion"):
        if field not in row:
            raise _Invalid(location, f'missing field "{field}"; a prompt/completion row needs both')
    return PromptCompletionExample(
        prompt=_json_string(row, "prompt", location, allow_empty=True),
        completion=_json_string(row, "completion", location, allow_empty=False),
    )


def _messages_row(row: dict, location: str) -> ChatExample:
    items = row["messages"]
    if not isinstance(items, list):
        raise _Invalid(location, f'"messages" must be a list, got {_json_type(items)}')
    if not items:
        raise _Invalid(location, '"messages" is an empty list')
    messages = tuple(_chat_message(item, f'"messages"[{index}]', location) for index, item in enumerate(items))
    _check_conversation(messages, location)
    return ChatExample(messages)


def _chat_message(item: object, name: str, location: str) -> ChatMessage:
    if not isinstance(item, dict):
        raise _Invalid(location, f"{name} must be an object, got {_json_type(item)}")
    for field in ("role", "content"):
        if field not in item:
            raise _Invalid(location, f'{name} has no "{field}"')
        if not isinstance(item[field], str):
            raise _Invalid(location, f"{name}.{field} must be a string, got {_json_type(item[field])}")
    role = item["role"]
    if role not in CHAT_ROLES:
        raise _Invalid(location, f"{name}.role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
    if role == "assistant" and not item["content"].strip():
        raise _Invalid(location, f"{name}.content is empty; an assistant message needs text to train on")
    _check_unicode(item["content"], f"{name}.content", location)
    return ChatMessage(role=role, content=item["content"])


def _check_conversation(messages: tuple[ChatMessage, ...], location: str) -> None:
    for index, message in enumerate(messages):
        if message.role == "system" and index > 0:
            raise _Invalid(location, f'"messages"[{index}] is a system message; only the first message may be one')
    if messages[0].role == "assistant":
        # Chat templates cannot render the empty conversation before it, so the start of
        # this turn in the rendered text could not be found.
        raise _Invalid(location, '"messages"[0] is an assistant message; start with a system or user message')
    if not any(message.role == "assistant" for message in messages):
        raise _Invalid(location, '"messages" has no assistant message; there is nothing to train on')


def _json_string(row: dict, field: str, location: str, *, allow_empty: bool) -> str:
    value = row[field]
    if not isinstance(value, str):
        raise _Invalid(location, f'"{field}" must be a string, got {_json_type(value)}')
    if not allow_empty and not value.strip():
        raise _Invalid(location, f'"{field}" is empty')
    _check_unicode(value, f'"{field}"', location)
    return value


def _check_unicode(value: str, name: str, location: str) -> None:
    """A JSON escape such as "\\ud800" decodes to a lone surrogate, which no tokenizer accepts."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _Invalid(
            location,
            f"{name} holds a lone surrogate (\\u{ord(value[exc.start]):04x} at character {exc.start + 1}), "
            "which is not valid Unicode; escape a character outside the BMP as a surrogate pair or write it as is",
        ) from None


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


_JSON_ROW_BUILDERS: dict[str, Callable[[dict, str], Example]] = {
    "text": _text_row,
    "prompt_completion": _prompt_completion_row,
    "messages": _messages_row,
}


# --- CSV -----------------------------------------------------------------------------

_CSV_COLUMNS: dict[str, tuple[str, ...]] = {"text": ("text",), "prompt_completion": ("prompt", "completion")}
# Columns whose value may be empty; every other required column needs text.
_CSV_MAY_BE_EMPTY = frozenset({"prompt"})


@dataclass(frozen=True)
class _CsvHeader:
    kind: ExampleKind
    positions: dict[str, int]  # required column name -> index in each row
    width: int  # number of header columns


def _parse_csv(text: str) -> Located:
    if csv.field_size_limit() < CSV_FIELD_SIZE_LIMIT:
        csv.field_size_limit(CSV_FIELD_SIZE_LIMIT)
    rows = _csv_rows(text)
    first = next(rows, None)
    if first is None:
        return
    header = _csv_header(*first)
    for number, fields in rows:
        try:
            yield f"row {number}", _csv_example(header, fields, f"row {number}")
        except _Invalid as problem:
            yield f"row {number}", problem


def _csv_rows(text: str) -> Iterator[tuple[int, list[str]]]:
    """Non-empty rows numbered as a spreadsheet shows them (the first row is row 1)."""
    # strict: an unclosed quote is an error instead of swallowing the rest of the file.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    number = 0
    while True:
        number += 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise _Invalid(
                f"row {number}",
                f"malformed CSV: {exc}; put fields that contain commas, quotes or line breaks in double "
                'quotes and write a quote inside them as ""',
            ) from None
        if any(field.strip() for field in fields):
            yield number, fields


def _csv_header(number: int, fields: list[str]) -> _CsvHeader:
    names = [field.strip() for field in fields]
    location = f"row {number}"
    found = ", ".join(repr(name) for name in names)
    kinds = [kind for kind, columns in _CSV_COLUMNS.items() if any(column in names for column in columns)]
    if len(kinds) > 1:
        raise _Invalid(
            location,
            f"the header has both 'text' and 'prompt'/'completion' columns; keep one format (columns found: {found})",
        )
    if not kinds:
        raise _Invalid(
            location,
            f"missing column 'text' (or columns 'prompt' and 'completion'); columns found: {found}; "
            "the first row must be a header and column names are lowercase",
        )
    required = _CSV_COLUMNS[kinds[0]]
    for column in required:
        if column not in names:
            raise _Invalid(location, f"missing column {column!r}; columns found: {found}")
        if names.count(column) > 1:
            raise _Invalid(location, f"column {column!r} appears {names.count(column)} times; keep one")
    return _CsvHeader(kind=kinds[0], positions={column: names.index(column) for column in required}, width=len(names))


def _csv_example(header: _CsvHeader, fields: list[str], location: str) -> Example:
    if len(fields) > header.width:
        raise _Invalid(
            location,
            f"{len(fields)} fields but the header has {header.width} columns; put fields that contain commas "
            "in double quotes",
        )
    values = {}
    for column, position in header.positions.items():
        if position >= len(fields):
            raise _Invalid(location, f"missing column {column!r} (the row has {len(fields)} of {header.width} fields)")
        if column not in _CSV_MAY_BE_EMPTY and not fields[position].strip():
            raise _Invalid(location, f"column {column!r} is empty")
        values[column] = fields[position]
    if header.kind == "text":
        return TextExample(values["text"])
    return PromptCompletionExample(prompt=values["prompt"], completion=values["completion"])


# --- plain text ----------------------------------------------------------------------


def _parse_txt(text: str) -> Located:
    block: list[str] = []
    block_number = start_line = 0
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip()
        if line:
            if not block:
                block_number, start_line = block_number + 1, number
            block.append(line)
        elif block:
            yield f"block {block_number} (line {start_line})", TextExample("\n".join(block))
            block = []
    if block:
        yield f"block {block_number} (line {start_line})", TextExample("\n".join(block))


_PARSERS: dict[str, Callable[[str], Located]] = {"jsonl": _parse_jsonl, "csv": _parse_csv, "txt": _parse_txt}
