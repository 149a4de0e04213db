"""Uploaded dataset files: what is accepted, and what each rejection says."""

from __future__ import annotations

import csv
import gzip
import io
import json
import zipfile

import pytest
from dataset_files import jsonl

from splitcore.data import formats as data_formats
from splitcore.data.formats import (
    ChatExample,
    ChatMessage,
    DatasetFormatError,
    ParsedDataset,
    PromptCompletionExample,
    TextExample,
    load_dataset_file,
    parse_dataset,
)


def rejection(data: bytes | str, filename: str) -> str:
    if isinstance(data, str):
        data = data.encode()
    with pytest.raises(DatasetFormatError) as caught:
        parse_dataset(data, filename)
    return str(caught.value)


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi?"},
    {"role": "assistant", "content": "Hello."},
]


# --- the error type -------------------------------------------------------------------


def test_error_carries_file_location_and_reason():
    err = DatasetFormatError("train.jsonl", "line 7", "invalid JSON")
    assert (err.filename, err.location, err.reason) == ("train.jsonl", "line 7", "invalid JSON")
    assert str(err) == "train.jsonl: line 7: invalid JSON"
    assert str(DatasetFormatError("train.jsonl", "", "no examples found")) == "train.jsonl: no examples found"
    assert isinstance(err, ValueError)


def test_errors_from_parsing_have_the_attributes_set():
    with pytest.raises(DatasetFormatError) as caught:
        parse_dataset(b'{"text": "a"}\n{"text": 3}\n', "d.jsonl")
    assert (caught.value.filename, caught.value.location) == ("d.jsonl", "line 2")
    assert caught.value.reason == '"text" must be a string, got a number'


# --- choosing the format --------------------------------------------------------------


@pytest.mark.parametrize(
    "filename,file_format",
    [("a.jsonl", "jsonl"), ("a.ndjson", "jsonl"), ("A.JSONL", "jsonl"), ("a.csv", "csv"), ("a.CSV", "csv"),
     ("a.txt", "txt"), ("notes.Txt", "txt")],
)
def test_extension_picks_the_format(filename, file_format):
    content = {"jsonl": jsonl({"text": "hi"}), "csv": b"text\nhi\n", "txt": b"hi\n"}[file_format]
    parsed = parse_dataset(content, filename)
    expected = ParsedDataset(filename=filename, file_format=file_format, kind="text", examples=(TextExample("hi"),))
    assert parsed == expected


@pytest.mark.parametrize(
    "filename,found",
    [("data.json", "the extension '.json'"), ("data.xlsx", "the extension '.xlsx'"), ("data", "no extension")],
)
def test_other_extensions_are_rejected_naming_the_accepted_ones(filename, found):
    assert rejection(b'{"text": "hi"}\n', filename) == (
        f"{filename}: unsupported file type ({found}); upload a .jsonl (or .ndjson), .csv or .txt file"
    )


def test_load_dataset_file_reads_the_file_and_names_it(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_bytes(jsonl({"messages": CHAT}))
    parsed = load_dataset_file(path)
    assert parsed.filename == "chat.jsonl"
    assert parsed.kind == "messages"
    bad = tmp_path / "broken.csv"
    bad.write_text("prompt\nhello\n")
    with pytest.raises(DatasetFormatError, match=r"^broken\.csv: row 1: missing column 'completion'"):
        load_dataset_file(str(bad))


# --- encoding -------------------------------------------------------------------------


@pytest.mark.parametrize("filename", ["d.jsonl", "d.csv", "d.txt"])
def test_bom_and_crlf_are_accepted(filename):
    content = {
        "d.jsonl": b'{"text": "first"}\r\n\r\n{"text": "second"}\r\n',
        "d.csv": b'text\r\nfirst\r\n"second"\r\n',
        "d.txt": b"first\r\n\r\nsecond\r\n",
    }[filename]
    parsed = parse_dataset(b"\xef\xbb\xbf" + content, filename)
    assert parsed.examples == (TextExample("first"), TextExample("second"))


def test_crlf_inside_a_quoted_csv_field_becomes_a_newline():
    parsed = parse_dataset(b'text\r\n"two\r\nlines"\r\n', "d.csv")
    assert parsed.examples == (TextExample("two\nlines"),)


def test_invalid_utf8_names_the_line_byte_and_column():
    data = b'{"text": "ok"}\n{"text": "fine"}\n{"t\xffext": 1}\n'
    assert rejection(data, "d.jsonl") == (
        "d.jsonl: line 3: not valid UTF-8 (byte 0xff at column 4); save the file as UTF-8"
    )


def test_invalid_utf8_column_counts_characters_not_bytes():
    data = "é€x".encode() + b"\xe9t\xe9\n"  # Latin-1 "été" after three good characters
    assert rejection(data, "d.txt") == "d.txt: line 1: not valid UTF-8 (byte 0xe9 at column 4); save the file as UTF-8"


def save_as_utf8(encoding: str) -> str:
    return (f'the file is {encoding} text; save it as UTF-8 (for example in Excel choose Save As > "CSV UTF-8", '
            f'in Notepad choose Save As with Encoding "UTF-8", or run iconv -f {encoding} -t UTF-8)')


NOT_TEXT = "not text: upload JSONL, CSV or plain text saved as UTF-8"
WIDE_TEXT = {
    "csv": "text\nhello, world\n",
    "jsonl": '{"prompt": "Capital of France?", "completion": " Paris."}\n',
    # Mostly Cyrillic letters: the NUL high bytes come from spaces, digits and punctuation.
    "txt": "Привет, мир! Как дела? 1, 2, 3.\n\nВторой абзац: всё хорошо.\n",
}


@pytest.mark.parametrize("file_format", WIDE_TEXT)
@pytest.mark.parametrize("codec,encoding", [
    ("utf-16", "UTF-16"), ("utf-16-le", "UTF-16"), ("utf-16-be", "UTF-16"),
    ("utf-32", "UTF-32"), ("utf-32-le", "UTF-32"), ("utf-32-be", "UTF-32"),
])
def test_utf16_and_utf32_are_named_with_or_without_a_byte_order_mark(file_format, codec, encoding):
    data = WIDE_TEXT[file_format].encode(codec)
    assert data.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")) == (codec in ("utf-16", "utf-32"))
    filename = f"d.{file_format}"
    assert rejection(data, filename) == f"{filename}: {save_as_utf8(encoding)}"


def zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("sheet.csv", "text\nhello\n")
    return buffer.getvalue()


BINARY_FILES = {
    "zip or xlsx": (zip_bytes, "a ZIP archive or an Excel .xlsx workbook"),
    "xls": (lambda: b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(range(256)),
            "an Excel .xls workbook or a Word .doc file"),
    "gzip": (lambda: gzip.compress(b'{"text": "hello"}\n'), "a gzip-compressed file"),
    "pdf": (lambda: b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", "a PDF document"),
    "parquet": (lambda: b"PAR1\x15\x04\x15\x10\x15\x14L\x15\x02\x15\x00\x12\x00\x00PAR1", "a Parquet file"),
    "png": (lambda: b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "a PNG image"),
}


@pytest.mark.parametrize("extension", [".jsonl", ".csv", ".txt"])
@pytest.mark.parametrize("case", BINARY_FILES)
def test_binary_files_are_named_by_their_magic_number(case, extension):
    make, description = BINARY_FILES[case]
    assert rejection(make(), "upload" + extension) == (
        f"upload{extension}: this is a binary file (it looks like {description}), {NOT_TEXT}"
    )


def test_a_nul_byte_in_otherwise_unknown_data_says_where():
    assert rejection(b"hello\nwor\x00ld\n", "d.txt") == (
        "d.txt: line 2: this looks like a binary file, not text (it has a NUL byte at column 4): "
        "upload JSONL, CSV or plain text saved as UTF-8"
    )
    assert rejection(bytes(64), "d.jsonl") == (
        "d.jsonl: line 1: this looks like a binary file, not text (it has a NUL byte at column 1): "
        "upload JSONL, CSV or plain text saved as UTF-8"
    )


def test_text_that_starts_like_a_binary_format_is_still_text():
    # Magic numbers only explain data that is not UTF-8 text; "PAR1" or "BZh" may begin a line of text.
    parsed = parse_dataset(b"PAR1 is a part number.\n\nBZh, said the bee.\n", "d.txt")
    assert parsed.examples == (TextExample("PAR1 is a part number."), TextExample("BZh, said the bee."))


# --- JSONL ----------------------------------------------------------------------------


def test_jsonl_text_rows():
    parsed = parse_dataset(jsonl({"text": "one"}, {"text": "two\nlines", "id": 7}), "d.jsonl")
    assert (parsed.file_format, parsed.kind) == ("jsonl", "text")
    assert parsed.examples == (TextExample("one"), TextExample("two\nlines"))


def test_jsonl_prompt_completion_rows_allow_an_empty_prompt():
    parsed = parse_dataset(
        jsonl({"prompt": "2+2=", "completion": " 4"}, {"id": "x", "prompt": "", "completion": "free"}), "d.jsonl"
    )
    assert parsed.kind == "prompt_completion"
    assert parsed.examples == (PromptCompletionExample("2+2=", " 4"), PromptCompletionExample("", "free"))


def test_jsonl_messages_rows():
    conversation = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "name": "bot"},
                    {"role": "user", "content": ""}, {"role": "assistant", "content": "c"}]
    parsed = parse_dataset(jsonl({"messages": CHAT}, {"messages": conversation, "id": 2}), "d.jsonl")
    assert parsed.kind == "messages"
    assert parsed.examples[0] == ChatExample(
        (ChatMessage("system", "Be brief."), ChatMessage("user", "Hi?"), ChatMessage("assistant", "Hello."))
    )
    assert [m.role for m in parsed.examples[1].messages] == ["user", "assistant", "user", "assistant"]
    assert [example.kind for example in parsed.examples] == ["messages", "messages"]


def test_jsonl_blank_lines_are_skipped_and_line_numbers_still_count_them():
    data = b'{"text": "a"}\n\n   \n{"text": "b"}\n{"text": ""}\n'
    assert rejection(data, "d.jsonl") == 'd.jsonl: line 5: "text" is empty'


def test_jsonl_invalid_json_names_line_and_column():
    data = b'{"text": "a"}\n{"text": "b" "x"}\n'
    assert rejection(data, "d.jsonl") == "d.jsonl: line 2: invalid JSON: Expecting ',' delimiter (column 14)"


@pytest.mark.parametrize(
    "line,got",
    [('"just a string"', "a string"), ("42", "a number"), ("null", "null"), ("true", "a boolean"),
     ('[{"text": "a"}]', "an array; JSONL needs one object per line, not one JSON array for the whole file")],
)
def test_jsonl_rows_must_be_objects(line, got):
    assert rejection(line + "\n", "d.jsonl") == f"d.jsonl: line 1: expected a JSON object, got {got}"


@pytest.mark.parametrize("document,what", [([{"text": "a"}, {"text": "b"}], "an array"),
                                           ({"data": [{"text": "a"}]}, "an object")])
def test_a_pretty_printed_json_file_is_one_problem_of_the_whole_file(document, what):
    data = json.dumps(document, indent=2)
    assert rejection(data.encode(), "d.jsonl") == (
        f"d.jsonl: the file is one JSON document ({what}) over {data.count(chr(10)) + 1} lines, not JSON Lines: write "
        "each example as one JSON object on a line of its own (jq -c '.[]' data.json > data.jsonl does it for an "
        "array)")


def test_a_broken_pretty_printed_file_still_says_what_is_wrong_line_by_line():
    data = json.dumps([{"text": "a"}], indent=2)[:-1]  # the closing bracket is missing: not one document
    assert rejection(data.encode(), "d.jsonl").splitlines()[0] == (
        "d.jsonl: line 1: invalid JSON: Expecting value (column 2)")


@pytest.mark.parametrize(
    "row,reason",
    [
        ({"text": "a", "messages": CHAT},
         'ambiguous row: it has "text" and "messages"; use exactly one format per row'),
        ({"text": "a", "prompt": "p", "completion": "c"},
         'ambiguous row: it has "text" and "prompt" and "completion"; use exactly one format per row'),
        ({"id": 1, "input": "x"}, 'no "text", "prompt"/"completion" or "messages" field (keys found: "id", "input")'),
        ({}, 'no "text", "prompt"/"completion" or "messages" field (keys found: none)'),
        ({"text": None}, '"text" must be a string, got null'),
        ({"text": ["a"]}, '"text" must be a string, got an array'),
        ({"text": " \n\t"}, '"text" is empty'),
        ({"prompt": "p"}, 'missing field "completion"; a prompt/completion row needs both'),
        ({"completion": "c"}, 'missing field "prompt"; a prompt/completion row needs both'),
        ({"prompt": 1, "completion": "c"}, '"prompt" must be a string, got a number'),
        ({"prompt": "p", "completion": {"x": 1}}, '"completion" must be a string, got an object'),
        ({"prompt": "p", "completion": "  "}, '"completion" is empty'),
        ({"messages": "hi"}, '"messages" must be a list, got a string'),
        ({"messages": []}, '"messages" is an empty list'),
        ({"messages": [CHAT[1], "hello"]}, '"messages"[1] must be an object, got a string'),
        ({"messages": [{"content": "x"}]}, '"messages"[0] has no "role"'),
        ({"messages": [{"role": "user"}]}, '"messages"[0] has no "content"'),
        ({"messages": [{"role": 1, "content": "x"}]}, '"messages"[0].role must be a string, got a number'),
        ({"messages": [{"role": "user", "content": None}]}, '"messages"[0].content must be a string, got null'),
        ({"messages": [CHAT[1], CHAT[2], {"role": "bot", "content": "x"}]},
         "\"messages\"[2].role must be one of system, user, assistant, got 'bot'"),
        ({"messages": [CHAT[1], {"role": "User", "content": "x"}]},
         "\"messages\"[1].role must be one of system, user, assistant, got 'User'"),
        ({"messages": [CHAT[1], CHAT[2], CHAT[0]]},
         '"messages"[2] is a system message; only the first message may be one'),
        ({"messages": [CHAT[0], CHAT[1]]}, '"messages" has no assistant message; there is nothing to train on'),
        ({"messages": [CHAT[1], {"role": "assistant", "content": " "}]},
         '"messages"[1].content is empty; an assistant message needs text to train on'),
        ({"messages": [CHAT[2], CHAT[1], CHAT[2]]},
         '"messages"[0] is an assistant message; start with a system or user message'),
    ],
)
def test_jsonl_row_rejections(row, reason):
    assert rejection(b"\n" + jsonl(row), "d.jsonl") == f"d.jsonl: line 2: {reason}"


def test_jsonl_user_content_may_be_empty():
    parsed = parse_dataset(jsonl({"messages": [{"role": "user", "content": ""}, CHAT[2]]}), "d.jsonl")
    assert parsed.examples[0].messages[0] == ChatMessage("user", "")


def test_system_then_assistant_is_accepted():
    parsed = parse_dataset(jsonl({"messages": [CHAT[0], CHAT[2]]}), "d.jsonl")
    assert [m.role for m in parsed.examples[0].messages] == ["system", "assistant"]


@pytest.mark.parametrize(
    "second,reason",
    [
        ({"prompt": "p", "completion": "c"}, "this row is prompt/completion but line 2 is text"),
        ({"messages": CHAT}, "this row is chat messages but line 2 is text"),
    ],
)
def test_jsonl_mixed_kinds_are_rejected(second, reason):
    data = b"\n" + jsonl({"text": "a"}, {"text": "b"}, {"text": "c"}, second)
    assert rejection(data, "mixed.jsonl") == f"mixed.jsonl: line 5: {reason}; use one format per file"


def test_jsonl_mixed_kinds_name_the_first_rows_kind():
    data = jsonl({"messages": CHAT}, {"text": "b"})
    assert rejection(data, "d.jsonl") == (
        "d.jsonl: line 2: this row is text but line 1 is chat messages; use one format per file"
    )


# --- CSV ------------------------------------------------------------------------------


def test_csv_text_column_with_extra_columns():
    data = 'id,text,source\n1,"Hello, world",web\n2,"Two\nlines",book\n3,plain,\n'
    parsed = parse_dataset(data.encode(), "d.csv")
    assert (parsed.file_format, parsed.kind) == ("csv", "text")
    assert parsed.examples == (TextExample("Hello, world"), TextExample("Two\nlines"), TextExample("plain"))


def test_csv_prompt_completion_with_padded_header_and_empty_prompt():
    data = ' prompt , completion\nQ: 2+2?,4\n"",  free text\n'
    parsed = parse_dataset(data.encode(), "d.csv")
    assert parsed.kind == "prompt_completion"
    # Values are kept as written; only header names are stripped.
    assert parsed.examples == (PromptCompletionExample("Q: 2+2?", "4"), PromptCompletionExample("", "  free text"))


def test_csv_quotes_inside_quoted_fields():
    parsed = parse_dataset(b'text\n"She said ""hi"""\n', "d.csv")
    assert parsed.examples == (TextExample('She said "hi"'),)


def test_csv_empty_rows_are_skipped_but_counted():
    ok = parse_dataset(b'text,id\n\na\n,\n \n"",""\nb\n', "d.csv")
    assert ok.examples == (TextExample("a"), TextExample("b"))
    assert rejection("text,id\n\na\n,\n \nb\n  ,7\n", "d.csv") == "d.csv: row 7: column 'text' is empty"


def test_csv_rows_are_numbered_as_records_not_lines():
    data = 'prompt,completion\n"multi\nline\nprompt",ok\nonly-prompt\n'
    assert rejection(data, "d.csv") == "d.csv: row 3: missing column 'completion' (the row has 1 of 2 fields)"


@pytest.mark.parametrize(
    "header,reason",
    [
        ("prompt,id", "missing column 'completion'; columns found: 'prompt', 'id'"),
        ("completion", "missing column 'prompt'; columns found: 'completion'"),
        ("Text,label", "missing column 'text' (or columns 'prompt' and 'completion'); columns found: 'Text', "
                       "'label'; the first row must be a header and column names are lowercase"),
        ("text,prompt,completion", "the header has both 'text' and 'prompt'/'completion' columns; keep one format "
                                   "(columns found: 'text', 'prompt', 'completion')"),
        ("text,id,text", "column 'text' appears 2 times; keep one"),
    ],
)
def test_csv_header_rejections(header, reason):
    assert rejection(f"{header}\nx,y,z\n", "d.csv") == f"d.csv: row 1: {reason}"


def test_csv_without_a_header_fails_on_row_one():
    message = rejection("Hello there\nHow are you\n", "d.csv")
    assert message.startswith("d.csv: row 1: missing column 'text' (or columns 'prompt' and 'completion'); "
                              "columns found: 'Hello there'")


def test_csv_header_after_blank_lines_keeps_its_row_number():
    assert rejection("\n\nprompt\nx\n", "d.csv") == "d.csv: row 3: missing column 'completion'; columns found: 'prompt'"


def test_csv_too_many_fields_only_when_no_header_column_holds_them():
    assert parse_dataset(b"text,a,b\nx,1,2\ny\n", "d.csv").examples == (TextExample("x"), TextExample("y"))
    assert rejection("text,a\nHello, world,1\n", "d.csv") == (
        "d.csv: row 2: 3 fields but the header has 2 columns; put fields that contain commas in double quotes"
    )


@pytest.mark.parametrize(
    "data,row,problem",
    [
        ('text\nok\n"never closed\nmore\n', 3, "unexpected end of data"),
        ('text\n"quoted"trailing\n', 2, "',' expected after '\"'"),
    ],
)
def test_malformed_csv_names_the_row(data, row, problem):
    assert rejection(data, "d.csv") == (
        f"d.csv: row {row}: malformed CSV: {problem}; put fields that contain commas, quotes or line breaks "
        'in double quotes and write a quote inside them as ""'
    )


def test_csv_accepts_fields_longer_than_the_stdlib_default_limit():
    long_text = "word " * 100_000  # 500 kB, far above csv's default 128 KiB
    parsed = parse_dataset(f'text\n"{long_text}"\n'.encode(), "d.csv")
    assert parsed.examples == (TextExample(long_text),)
    assert csv.field_size_limit() >= data_formats.CSV_FIELD_SIZE_LIMIT


# --- TXT ------------------------------------------------------------------------------


def test_txt_blocks_keep_inner_line_breaks_and_drop_trailing_whitespace():
    data = "\n\nFirst line  \n  indented second\t\n \t\nSecond block\n\n\n\nThird\nblock   \n"
    parsed = parse_dataset(data.encode(), "d.txt")
    assert (parsed.file_format, parsed.kind) == ("txt", "text")
    assert parsed.examples == (
        TextExample("First line\n  indented second"), TextExample("Second block"), TextExample("Third\nblock"),
    )


def test_txt_without_a_final_newline():
    assert parse_dataset(b"one\n\ntwo", "d.txt").examples == (TextExample("one"), TextExample("two"))


# --- whole-file rules -----------------------------------------------------------------


@pytest.mark.parametrize(
    "filename,data,hint",
    [
        ("e.jsonl", "\n  \n", 'a JSONL file needs one JSON object per line: {"text": ...}, {"prompt": ..., '
                               '"completion": ...} or {"messages": [{"role": ..., "content": ...}, ...]}'),
        ("e.jsonl", "", "a JSONL file needs one JSON object per line"),
        ("e.csv", "text,id\n\n,\n", "a CSV file needs a header row with a 'text' column, or 'prompt' and "
                                    "'completion' columns, and then one row per example"),
        ("e.csv", "", "a CSV file needs a header row"),
        ("e.txt", " \n\t\n", "a text file needs one example per block of lines, with a blank line between blocks"),
        ("e.txt", "\ufeff", "a text file needs one example per block of lines"),
    ],
)
def test_files_without_examples_are_rejected(filename, data, hint):
    message = rejection(data.encode(), filename)
    assert message.startswith(f"{filename}: no examples found; {hint}")


def test_example_cap(monkeypatch):
    monkeypatch.setattr(data_formats, "MAX_EXAMPLES", 3)
    assert len(parse_dataset(b"a\n\nb\n\nc\n", "d.txt").examples) == 3
    assert rejection(b"a\n\nb\n\nc\n\nd\n", "d.txt") == "d.txt: more than 3 examples; split the data into smaller files"
    assert data_formats.MAX_EXAMPLES == 3
    monkeypatch.undo()
    assert data_formats.MAX_EXAMPLES == 1_000_000


def test_examples_and_datasets_are_frozen():
    example = TextExample("a")
    with pytest.raises(AttributeError):
        example.text = "b"  # type: ignore[misc]
    assert {TextExample("a"), TextExample("a")} == {example}
    assert (TextExample("a").kind, PromptCompletionExample("", "b").kind, ChatExample(()).kind) == (
        "text", "prompt_completion", "messages",
    )
