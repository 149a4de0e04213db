"""The trunk owner's own public text, available offline: the Python reference manual.

CPython ships the prose of its language reference as ``pydoc_data.topics`` (about 450k
characters of English with some code). The simulated trunk owner tokenises it with the
model's public tokenizer, exactly as a data owner's examples are tokenised
(``splitcore.data.examples``). Half of the chunks are rendered with the model's chat template,
which is as public as its weights, so the attacker has also seen the template's own tokens.

Everything here is deterministic: the same tokenizer and sizes give the same chunks.
"""

from __future__ import annotations

import random
from functools import lru_cache

from splitcore.data.examples import tokenize_example
from splitcore.data.formats import ChatExample, ChatMessage, Example, TextExample

MIN_PARAGRAPH_CHARS = 40
# A fixed order, unrelated to any run's seed: the public corpus is the same for every audit.
_SHUFFLE_SEED = 1234


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


def _public_examples(paragraphs: tuple[str, ...], chat: bool):
    """Examples made of paragraph pairs; every other one a user/assistant exchange when ``chat``."""
    for index in range(0, len(paragraphs) - 1, 2):
        first, second = paragraphs[index], paragraphs[index + 1]
        if chat and (index // 2) % 2 == 0:
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


def public_token_chunks(tokenizer, total_tokens: int, chunk_tokens: int) -> list[tuple[int, ...]]:
    """About ``total_tokens`` tokens of public text, as chunks of at most ``chunk_tokens`` tokens.

    Each chunk is the start of one public example (so positions run from 0, like the
    data owner's examples); chunks of fewer than two tokens are skipped.
    """
    if total_tokens < 1 or chunk_tokens < 2:
        raise ValueError(f"public text needs total_tokens >= 1 and chunk_tokens >= 2, got {total_tokens} and "
                         f"{chunk_tokens}")
    chat = bool(getattr(tokenizer, "chat_template", None))
    chunks: list[tuple[int, ...]] = []
    collected = 0
    for example in _public_examples(public_paragraphs(), chat):
        if collected >= total_tokens:
            break
        ids = _tokens(tokenizer, example, chunk_tokens)
        if len(ids) >= 2:
            chunks.append(ids)
            collected += len(ids)
    if collected < total_tokens:
        raise ValueError(
            f"the public text holds only {collected} tokens for this tokenizer at {chunk_tokens} tokens per chunk; "
            f"ask for at most that many public tokens"
        )
    return chunks
