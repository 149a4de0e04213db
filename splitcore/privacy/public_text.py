"""The trunk owner's own public text, available offline.

Two corpora, both tokenised with the model's public tokenizer exactly as a data owner's
examples are tokenised (``splitcore.data.examples``):

* ``reference`` (the default): CPython ships the prose of its language reference as
  ``pydoc_data.topics`` (about 450k characters of English with some code).
* ``extended``: the reference, interleaved example by example (two paragraphs each) with the
  documentation that installed software ships in its source: the docstrings of Python's
  standard library and of the pinned packages in ``DOCSTRING_PACKAGES`` (read with ``ast``,
  never imported), cleaned of code-ish lines. About seven times the reference (706k tokens
  against 98k for the default model's tokenizer in chunks of 128); an attacker who wants to
  train a bigger inversion has it on any machine.

Half of the examples are rendered with the model's chat template, which is as public as its
weights, so the attacker has also seen the template's own tokens.

Everything here is deterministic: the same tokenizer, sizes and installed packages give the
same chunks. Files are read in a fixed shuffled order of their paths relative to their
package, two paragraphs of each in turn, and only as many as the requested tokens need.
"""

from __future__ import annotations

import ast
import random
import re
import sysconfig
import warnings
from collections.abc import Iterable, Iterator
from functools import lru_cache
from itertools import count, islice, zip_longest
from pathlib import Path

from splitcore.data.examples import tokenize_example
from splitcore.data.formats import ChatExample, ChatMessage, Example, TextExample

REFERENCE = "reference"
EXTENDED = "extended"
CORPORA = (REFERENCE, EXTENDED)
MIN_PARAGRAPH_CHARS = 40
# A fixed order, unrelated to any run's seed: the public corpus is the same for every audit.
_SHUFFLE_SEED = 1234
# Installed packages whose docstrings join the extended corpus (all pinned by the project), read
# after the standard library's. A package that is missing is skipped.
DOCSTRING_PACKAGES = ("django", "rest_framework", "celery", "kombu")
# Folders of the standard library (or a package) whose files are not documentation.
_SKIPPED_FOLDERS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                              "pydoc_data", "lib2to3", "ensurepip", "migrations", "locale"})
# A docstring line is prose when at least this share of its characters are letters, spaces or
# ordinary punctuation; code, tables and markup fall below.
_PROSE_SHARE = 0.9
_MIN_PARAGRAPH_WORDS = 6
_PROSE_CHARACTERS = re.compile(r"[A-Za-z ,.;:'\"?!-]")
_CODE_STARTS = (">>>", "...", "$ ", ".. ", ":", "#", "|", "+-", "%")
# Paragraphs each file gives the documentation stream per turn: one example's worth.
_PARAGRAPHS_PER_TURN = 2


@lru_cache(maxsize=1)
def public_paragraphs() -> tuple[str, ...]:
    """The paragraphs of CPython's language reference, in a fixed shuffled order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions split pydoc_data into its own package
        raise RuntimeError(
            "the leakage audit needs CPython's pydoc_data module (the Python reference manual) as its public "
            "text; install your distribution's full Python standard library (e.g. Debian's libpython3-stdlib)"
        ) from exc
    paragraphs = [
        paragraph.strip()
        for key in sorted(topics)
        for paragraph in topics[key].split("\n\n")
        if len(paragraph.strip()) >= MIN_PARAGRAPH_CHARS
    ]
    random.Random(_SHUFFLE_SEED).shuffle(paragraphs)
    return tuple(paragraphs)


# --- docstrings of installed software --------------------------------------------------------


def _is_prose(line: str) -> bool:
    if not line or line.startswith(_CODE_STARTS):
        return False
    return len(_PROSE_CHARACTERS.findall(line)) >= _PROSE_SHARE * len(line)


def docstring_paragraphs(docstring: str) -> list[str]:
    """The prose paragraphs of one (cleaned, dedented) docstring, each on one line.

    Lines that look like code, doctests, markup or tables are dropped, and so is a literal
    block (the indented lines after a line ending in ``::``); a paragraph keeps its prose
    lines joined by single spaces when it has at least ``MIN_PARAGRAPH_CHARS`` characters and
    ``_MIN_PARAGRAPH_WORDS`` words.
    """
    paragraphs = []
    literal_block = False
    for block in re.split(r"\n\s*\n", docstring):
        lines = block.splitlines()
        indented = bool(lines) and all(line.startswith((" ", "\t")) for line in lines if line.strip())
        if literal_block and indented:
            continue
        literal_block = block.rstrip().endswith("::")
        if indented:
            lines = [line.strip() for line in lines]
        prose = [line.strip() for line in lines if _is_prose(line.strip())]
        text = " ".join(" ".join(prose).split()).removesuffix("::").strip()
        if len(text) >= MIN_PARAGRAPH_CHARS and len(text.split()) >= _MIN_PARAGRAPH_WORDS:
            paragraphs.append(text)
    return paragraphs


def _file_docstrings(path: Path) -> list[str]:
    """The docstrings of a Python source file (module, classes, functions), in source order; [] if it does not parse."""
    try:
        with warnings.catch_warnings():  # e.g. invalid escape sequences in someone else's source
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return []
    documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = sorted((node for node in ast.walk(tree) if isinstance(node, documented)),
                   key=lambda node: (getattr(node, "lineno", 0), getattr(node, "col_offset", 0)))
    return [docstring for node in nodes if (docstring := ast.get_docstring(node, clean=True))]


def _source_roots() -> list[tuple[str, Path]]:
    """(name, folder) of the standard library and of each installed package of ``DOCSTRING_PACKAGES``.

    Packages are looked up as folders of the interpreter's site-packages, never imported.
    """
    paths = sysconfig.get_paths()
    roots = [("stdlib", Path(paths["stdlib"]))]
    site_folders = dict.fromkeys(Path(paths[key]) for key in ("purelib", "platlib"))
    for package in DOCSTRING_PACKAGES:
        folder = next((site / package for site in site_folders if (site / package / "__init__.py").is_file()), None)
        if folder is not None:
            roots.append((package, folder))
    return roots


@lru_cache(maxsize=1)
def documentation_files() -> tuple[tuple[str, Path], ...]:
    """Every Python source file the extended corpus reads: (relative name, path), in a fixed shuffled order.

    The order depends only on the names relative to each package (``stdlib/json/decoder.py``),
    so it is the same wherever the packages are installed.
    """
    named = []
    for name, root in _source_roots():
        for path in root.rglob("*.py"):
            relative = path.relative_to(root)
            if not _SKIPPED_FOLDERS.intersection(relative.parts[:-1]):
                named.append((f"{name}/{relative.as_posix()}", path))
    named.sort()
    random.Random(_SHUFFLE_SEED).shuffle(named)
    return tuple(named)


@lru_cache(maxsize=None)
def _file_paragraphs(path: Path) -> tuple[str, ...]:
    return tuple(paragraph for docstring in _file_docstrings(path) for paragraph in docstring_paragraphs(docstring))


def documentation_paragraphs() -> Iterator[str]:
    """The prose paragraphs of installed software's docstrings, ``_PARAGRAPHS_PER_TURN`` of each file in turn.

    Files come in ``documentation_files`` order, round after round, so any prefix of the
    stream draws on many packages and modules. Lazy: a file is parsed when its first turn
    comes (and remembered for the process).
    """
    for start in count(0, _PARAGRAPHS_PER_TURN):
        found = False
        for _, path in documentation_files():
            paragraphs = _file_paragraphs(path)[start:start + _PARAGRAPHS_PER_TURN]
            found = found or bool(paragraphs)
            yield from paragraphs
        if not found:
            return


def corpus_paragraphs(corpus: str = REFERENCE) -> Iterator[str]:
    """The paragraphs of a public corpus in their fixed order (``CORPORA``).

    ``extended`` alternates the reference's paragraphs with the documentation's, two by two
    (an example is a pair of paragraphs), and continues with the documentation alone.
    """
    if corpus == REFERENCE:
        yield from public_paragraphs()
        return
    if corpus != EXTENDED:
        raise ValueError(f"unknown public corpus {corpus!r}; choose one of {', '.join(CORPORA)}")
    reference = public_paragraphs()
    # Whole pairs only (as the reference corpus makes its examples): no example mixes the two sources.
    reference_pairs = (reference[index:index + 2] for index in range(0, len(reference) - 1, 2))
    documentation = documentation_paragraphs()
    documentation_pairs = iter(lambda: tuple(islice(documentation, 2)), ())
    for first, second in zip_longest(reference_pairs, documentation_pairs, fillvalue=()):
        yield from first
        yield from second


# --- tokens ----------------------------------------------------------------------------------


def _public_examples(paragraphs: Iterable[str], chat: bool) -> Iterator[Example]:
    """Examples made of paragraph pairs; every other one a user/assistant exchange when ``chat``."""
    paragraphs = iter(paragraphs)
    for index, (first, second) in enumerate(zip(paragraphs, paragraphs)):
        if chat and index % 2 == 0:
            yield ChatExample(messages=(ChatMessage("user", first), ChatMessage("assistant", second)))
        else:
            yield TextExample(text=f"{first}\n\n{second}")


def _tokens(tokenizer, example: Example, chunk_tokens: int) -> tuple[int, ...]:
    try:
        return tokenize_example(tokenizer, example, chunk_tokens).input_ids
    except ValueError:  # a chat template that rejects this exchange: use the plain text instead
        if isinstance(example, ChatExample):
            text = "\n\n".join(message.content for message in example.messages)
            return tokenize_example(tokenizer, TextExample(text=text), chunk_tokens).input_ids
        raise


def public_token_chunks(tokenizer, total_tokens: int, chunk_tokens: int,
                        corpus: str = REFERENCE) -> list[tuple[int, ...]]:
    """About ``total_tokens`` tokens of public text, as chunks of at most ``chunk_tokens`` tokens.

    Each chunk is the start of one public example (so positions run from 0, like the
    data owner's examples); chunks of fewer than two tokens are skipped. ``corpus`` is
    ``reference`` (CPython's language reference) or ``extended`` (with installed
    software's docstrings: several times more text).
    """
    if total_tokens < 1 or chunk_tokens < 2:
        raise ValueError(f"public text needs total_tokens >= 1 and chunk_tokens >= 2, got {total_tokens} and "
                         f"{chunk_tokens}")
    if corpus not in CORPORA:
        raise ValueError(f"unknown public corpus {corpus!r}; choose one of {', '.join(CORPORA)}")
    chat = bool(getattr(tokenizer, "chat_template", None))
    chunks: list[tuple[int, ...]] = []
    collected = 0
    for example in _public_examples(corpus_paragraphs(corpus), chat):
        if collected >= total_tokens:
            break
        ids = _tokens(tokenizer, example, chunk_tokens)
        if len(ids) >= 2:
            chunks.append(ids)
            collected += len(ids)
    if collected < total_tokens:
        raise ValueError(
            f"the {corpus} public text holds only {collected} tokens for this tokenizer at {chunk_tokens} tokens per "
            f"chunk; ask for at most that many public tokens"
        )
    return chunks
