"""Property-based fuzzing of the dataset parsers.

Whatever bytes arrive under whatever name, ``parse_dataset`` either returns examples
that keep the documented invariants or raises ``DatasetFormatError`` naming the file
and a line, row or block (or, for whole-file problems, the reason) - never another
exception and never a hang. Valid records written as JSONL, CSV or text parse back
to the same examples.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from pathlib import Path

import pytest
from dataset_files import jsonl
from fuzzing import examples, mutated
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitcore.data.formats import (
    CHAT_ROLES,
    FILE_FORMATS,
    ChatExample,
    ChatMessage,
    DatasetFormatError,
    ParsedDataset,
    PromptCompletionExample,
    TextExample,
    parse_dataset,
)

# A hang fails the test instead of stalling the run.
pytestmark = pytest.mark.timeout(300)

EXTENSIONS = tuple(FILE_FORMATS)  # .jsonl, .ndjson, .csv, .txt
BOM = codecs.BOM_UTF8
_LOCATION = re.compile(r"^(?:(line|row) (\d+)|block (\d+) \(line (\d+)\))$")
# The only rejections that name no line or row: they are about the file as a whole.
_WHOLE_FILE_REASONS = ("unsupported file type", "no examples found", "more than", "the file is UTF-",
                       "this is a binary file")
# Inputs of several kilobytes are the point here; building them takes a moment.
_BIG_INPUTS = [HealthCheck.too_slow, HealthCheck.data_too_large]


# ---------------------------------------------------------------- the properties


def check_parse(data: bytes, filename: str) -> ParsedDataset | None:
    """Parse and check the outcome; returns the dataset, or None for a (well-formed) rejection."""
    try:
        parsed = parse_dataset(data, filename)
    except DatasetFormatError as error:
        check_rejection(error, data, filename)
        return None
    check_dataset(parsed, filename)
    return parsed


def check_rejection(error: DatasetFormatError, data: bytes, filename: str) -> None:
    assert error.filename == filename
    assert (error.location, error.reason) == error.problems[0]
    assert str(error) == "\n".join(error.messages())
    str(error).encode("utf-8")  # shown on a page: must be real text, e.g. no lone surrogates
    for location, reason in error.problems:
        check_problem(location, reason, data, filename)


def check_problem(location: str, reason: str, data: bytes, filename: str) -> None:
    assert reason.strip(), (location, reason)
    if not location:
        assert reason.startswith(_WHOLE_FILE_REASONS), reason
        return
    match = _LOCATION.match(location)
    assert match, f"unexpected location {location!r}"
    kind, number, _, block_line = match.groups()
    place = int(number or block_line)
    # A CSV record may end at a lone CR; JSONL and text lines end at LF only.
    lines = data.count(b"\n") + 1 + (data.count(b"\r") if kind == "row" else 0)
    assert 1 <= place <= lines, (location, lines)


def check_dataset(parsed: ParsedDataset, filename: str) -> None:
    file_format = FILE_FORMATS[Path(filename).suffix.lower()]
    assert parsed.filename == filename and parsed.file_format == file_format
    assert isinstance(parsed.examples, tuple) and parsed.examples
    assert {example.kind for example in parsed.examples} == {parsed.kind}
    allowed = {"jsonl": ("text", "prompt_completion", "messages"), "csv": ("text", "prompt_completion"),
               "txt": ("text",)}[file_format]
    assert parsed.kind in allowed
    for example in parsed.examples:
        check_example(example, file_format)


def check_example(example, file_format: str) -> None:
    def text(value: object, *, blank_ok: bool = False) -> str:
        assert isinstance(value, str)
        value.encode("utf-8")  # tokenizers refuse strings that are not valid Unicode
        assert blank_ok or value.strip(), repr(value)
        return value

    if isinstance(example, TextExample):
        body = text(example.text)
        if file_format == "txt":
            assert all(line and line == line.rstrip() for line in body.split("\n")), repr(body)
    elif isinstance(example, PromptCompletionExample):
        text(example.prompt, blank_ok=True)
        text(example.completion)
    else:
        assert isinstance(example, ChatExample) and isinstance(example.messages, tuple) and example.messages
        roles = [message.role for message in example.messages]
        assert set(roles) <= set(CHAT_ROLES), roles
        assert roles[0] != "assistant" and "system" not in roles[1:] and "assistant" in roles, roles
        for message in example.messages:
            text(message.content, blank_ok=message.role != "assistant")


# ---------------------------------------------------------------- strategies: valid records

# Text without NUL or lone surrogates: what a UTF-8 file can hold and the parsers accept.
valid_chars = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
any_text = st.text(valid_chars, max_size=30)
nonblank_text = st.text(valid_chars, min_size=1, max_size=30).filter(str.strip)
extra_keys = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8).filter(
    lambda key: key not in ("text", "prompt", "completion", "messages"))
extras = st.dictionaries(extra_keys, st.none() | st.integers() | any_text, max_size=2)


def message(roles: tuple[str, ...]):
    return st.builds(lambda role, content, blank: {"role": role, "content": content if role == "assistant" else blank},
                     st.sampled_from(roles), nonblank_text, any_text)


@st.composite
def conversations(draw) -> list[dict]:
    system = draw(st.lists(message(("system",)), max_size=1))
    first = draw(message(("user",)))
    before = draw(st.lists(message(("user", "assistant")), max_size=3))
    reply = draw(message(("assistant",)))
    after = draw(st.lists(message(("user", "assistant")), max_size=3))
    return [*system, first, *before, reply, *after]


def with_extras(rows):
    return st.builds(lambda row, extra: {**extra, **row}, rows, extras)


text_rows = with_extras(st.builds(lambda text: {"text": text}, nonblank_text))
prompt_completion_rows = with_extras(st.builds(lambda p, c: {"prompt": p, "completion": c}, any_text, nonblank_text))
chat_rows = with_extras(st.builds(lambda messages: {"messages": messages}, conversations()))
valid_json_datasets = st.one_of(*(st.lists(rows, min_size=1, max_size=6)
                                  for rows in (text_rows, prompt_completion_rows, chat_rows)))


def expected_from_json(row: dict):
    if "text" in row:
        return TextExample(row["text"])
    if "prompt" in row:
        return PromptCompletionExample(prompt=row["prompt"], completion=row["completion"])
    return ChatExample(tuple(ChatMessage(role=m["role"], content=m["content"]) for m in row["messages"]))


@st.composite
def file_layouts(draw) -> dict:
    """How a valid file may be laid out: BOM, CRLF, final newline."""
    return {"bom": draw(st.booleans()), "newline": draw(st.sampled_from(["\n", "\r\n"])),
            "final_newline": draw(st.booleans())}


def lay_out(lines: list[str], layout: dict) -> bytes:
    text = layout["newline"].join(lines) + (layout["newline"] if layout["final_newline"] else "")
    return (BOM if layout["bom"] else b"") + text.encode("utf-8")


@st.composite
def jsonl_files(draw) -> tuple[bytes, list[dict]]:
    rows = draw(valid_json_datasets)
    lines = []
    for row in rows:
        lines.extend([""] * draw(st.integers(0, 1)))  # blank lines are skipped
        lines.append(json.dumps(row, ensure_ascii=draw(st.booleans())))
    return lay_out(lines, draw(file_layouts())), rows


@st.composite
def csv_files(draw) -> tuple[bytes, list[dict]]:
    columns = draw(st.sampled_from([("text",), ("prompt", "completion")]))
    header = list(columns) + draw(st.lists(extra_keys, max_size=2))
    header = draw(st.permutations(header))
    values = {"text": nonblank_text, "prompt": any_text, "completion": nonblank_text}
    rows = draw(st.lists(st.fixed_dictionaries({c: values[c] for c in columns}), min_size=1, max_size=6))
    out = io.StringIO()
    line_end = draw(st.sampled_from(["\n", "\r\n"]))
    # Python's writer quotes a field with a CR only when CR is in its line terminator.
    quoting = csv.QUOTE_ALL if line_end == "\n" else draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]))
    writer = csv.writer(out, lineterminator=line_end, quoting=quoting)
    writer.writerow(header)
    for row in rows:
        writer.writerow([row[name] if name in row else draw(any_text) for name in header])
    return (BOM if draw(st.booleans()) else b"") + out.getvalue().encode("utf-8"), rows


txt_lines = st.text(valid_chars.filter(lambda c: c not in "\n\r"), min_size=1, max_size=30).map(str.rstrip).filter(bool)


@st.composite
def txt_files(draw) -> tuple[bytes, list[str]]:
    blocks = draw(st.lists(st.lists(txt_lines, min_size=1, max_size=4), min_size=1, max_size=5))
    lines: list[str] = [""] * draw(st.integers(0, 2))
    for block in blocks:
        lines.extend(block)
        lines.append(draw(st.sampled_from(["", " ", "\t  "])))  # a blank line ends a block
    return lay_out(lines, draw(file_layouts())), ["\n".join(block) for block in blocks]


# ---------------------------------------------------------------- strategies: junk and mutations

# Any code point, lone surrogates and NUL included.
junk_text = st.text(st.characters(exclude_categories=()), max_size=20)
json_keys = st.sampled_from(["text", "prompt", "completion", "messages", "role", "content"]) | junk_text
json_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | junk_text
                | st.sampled_from(list(CHAT_ROLES) + ["tool", "", "USER"]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(json_keys, inner, max_size=3), max_leaves=10)
message_like = st.fixed_dictionaries({}, optional={"role": json_values, "content": json_values})
junk_rows = st.one_of(
    json_values,
    st.dictionaries(json_keys, json_values, max_size=4),
    st.fixed_dictionaries({"text": json_values}),
    st.fixed_dictionaries({}, optional={"prompt": json_values, "completion": json_values}),
    st.fixed_dictionaries({"messages": st.lists(message_like | json_values, max_size=4) | json_values}),
)
# JSON that Python's json module reads in surprising ways.
raw_json_lines = st.sampled_from([
    '{"text": ' + "9" * 5000 + "}",  # beyond int's string conversion limit
    '{"text": "' + "\\ud800" + '"}', '{"text": "a\\udfffb"}',  # lone surrogate escapes
    '{"text": "\\u0000"}', '{"text": NaN}', '{"text": -Infinity}', '{"text": 1e999}',
    "[" * 5000 + "]" * 5000, '{"a":' * 3000 + "1" + "}" * 3000,  # nested too deeply
    '{"text": "a", "text": 7}', '{"text": "ok"} trailing', "\ufeff{\"text\": \"bom twice\"}",
    '"just a string"', "[]", "{}", "null",
])


def json_line(row: object, ascii_only: bool) -> str:
    try:
        return json.dumps(row, ensure_ascii=ascii_only)
    except ValueError:  # an integer too long to write as text
        return "{}"


@st.composite
def junk_jsonl_files(draw) -> bytes:
    lines = draw(st.lists(st.one_of(st.builds(json_line, junk_rows, st.booleans()), raw_json_lines,
                                    st.builds(json_line, text_rows, st.booleans())), min_size=1, max_size=6))
    layout = draw(file_layouts())
    # surrogatepass: a lone surrogate written raw becomes bytes that are not valid UTF-8
    text = layout["newline"].join(lines).encode("utf-8", "surrogatepass")
    return (BOM if layout["bom"] else b"") + text


csv_cells = junk_text | st.sampled_from(["text", "prompt", "completion", " text ", "Text", '"', '""', ",", "\r", ""])


@st.composite
def junk_csv_files(draw) -> bytes:
    rows = draw(st.lists(st.lists(csv_cells, max_size=4), min_size=1, max_size=6))
    out = io.StringIO()
    line_end = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    writer = csv.writer(out, quoting=draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONE])),
                        escapechar="\\", lineterminator=line_end)
    for row in rows:
        try:
            writer.writerow(row)
        except csv.Error:  # e.g. one empty field without quotes: write it as a careless exporter would
            out.write(",".join(row) + line_end)
    return out.getvalue().encode("utf-8", "surrogatepass")


# Bytes that matter to one of the formats or to UTF-8.
interesting_bytes = st.sampled_from([
    b'"', b",", b"\n", b"\r", b"\r\n", b"\n\n", b"{", b"}", b"[", b"]", b":", b"\\", b" ", b"x", b"\xc3\xa9",
    b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", BOM, b'"text"', b"null", b"\\u0000",
    b"\\ud800",
])


def valid_files(file_format: str):
    files = {"jsonl": jsonl_files(), "csv": csv_files(), "txt": txt_files()}[file_format]
    return files.map(lambda pair: pair[0])


def junk_files(file_format: str):
    return {"jsonl": junk_jsonl_files(), "csv": junk_csv_files(), "txt": st.binary(max_size=200)}[file_format]


# ---------------------------------------------------------------- tests

filenames = st.builds(lambda stem, extension: stem + extension,
                      st.text("abcxyz-_. 0123456789", max_size=10),
                      st.sampled_from([*EXTENSIONS, ".JSONL", ".Csv", ".TXT", ".json", ".tsv", ".txt.gz", ".", ""]))


@settings(max_examples=examples(400), suppress_health_check=_BIG_INPUTS)
@given(data=st.binary(max_size=2000), filename=filenames)
def test_arbitrary_bytes_parse_or_are_rejected_with_a_place(data, filename):
    check_parse(data, filename)


@pytest.mark.parametrize("extension", EXTENSIONS)
@settings(max_examples=examples(200), suppress_health_check=_BIG_INPUTS)
@given(data=st.data())
def test_mutated_valid_files_parse_or_are_rejected_with_a_place(extension, data):
    file_format = FILE_FORMATS[extension]
    # Mostly this extension's own format; sometimes another's, as a misnamed upload would be.
    source_format = data.draw(st.sampled_from([file_format] * 3 + ["jsonl", "csv", "txt"]), label="source")
    base = data.draw(valid_files(source_format), label="valid file")
    check_parse(data.draw(mutated(base, interesting_bytes), label="mutated"), "upload" + extension)


@pytest.mark.parametrize("extension", EXTENSIONS)
@settings(max_examples=examples(200), suppress_health_check=_BIG_INPUTS)
@given(data=st.data())
def test_junk_records_parse_or_are_rejected_with_a_place(extension, data):
    """Wrong types, nested junk, odd JSON, unbalanced quotes; as written and then mutated."""
    source = data.draw(junk_files(FILE_FORMATS[extension]), label="junk file")
    if data.draw(st.booleans(), label="mutate"):
        source = data.draw(mutated(source, interesting_bytes), label="mutated")
    check_parse(source, "upload" + extension)


@settings(max_examples=examples(200))
@given(files=jsonl_files(), extension=st.sampled_from([".jsonl", ".ndjson", ".JSONL"]))
def test_valid_jsonl_round_trips(files, extension):
    data, rows = files
    parsed = check_parse(data, "rows" + extension)
    assert parsed is not None
    assert parsed.examples == tuple(expected_from_json(row) for row in rows)


@settings(max_examples=examples(200))
@given(files=csv_files())
def test_valid_csv_round_trips(files):
    data, rows = files
    parsed = check_parse(data, "rows.csv")
    assert parsed is not None
    # CRLF line ends become LF everywhere, also inside quoted fields.
    expected = tuple(
        TextExample(row["text"].replace("\r\n", "\n")) if "text" in row
        else PromptCompletionExample(row["prompt"].replace("\r\n", "\n"), row["completion"].replace("\r\n", "\n"))
        for row in rows
    )
    assert parsed.examples == expected


@settings(max_examples=examples(200))
@given(files=txt_files())
def test_valid_text_files_round_trip(files):
    data, blocks = files
    parsed = check_parse(data, "notes.txt")
    assert parsed is not None
    assert parsed.examples == tuple(TextExample(block) for block in blocks)


def test_the_checks_accept_a_plain_valid_file():
    """The properties above are not vacuous: a known-good file passes them as a dataset."""
    assert check_parse(jsonl({"text": "hi"}, {"text": "there"}), "a.jsonl").examples == (
        TextExample("hi"), TextExample("there"))


@pytest.mark.parametrize("line,reason", [
    # json.loads raised a bare ValueError (Python's limit on integer digits), not a rejection
    ('{"text": "ok", "id": ' + "7" * 5000 + "}", "invalid JSON: a number has more than"),
    # a lone surrogate escape parsed into text that tokenizers refuse
    ('{"text": "caf\\udce9"}', '"text" holds a lone surrogate (\\udce9 at character 4)'),
    ('{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "ok"}]}',
     '"messages"[0].content holds a lone surrogate'),
])
def test_regressions_found_by_fuzzing(line, reason):
    with pytest.raises(DatasetFormatError) as caught:
        parse_dataset(('{"text": "first"}\n' + line + "\n").encode(), "found.jsonl")
    assert caught.value.location == "line 2" and reason in caught.value.reason, caught.value
