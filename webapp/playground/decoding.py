"""Token ids -> text pieces for streaming, as the ids arrive one by one."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

# What a tokenizer decodes an incomplete UTF-8 sequence to (a character split over tokens).
REPLACEMENT_CHARACTER = "\ufffd"


class IncrementalDecoder:
    """Decodes all ids so far (special tokens skipped) and reports only what changed.

    Decoding everything again, rather than each token alone, keeps spaces and multi-byte
    characters right; text ending in an incomplete character is held back until the
    next token completes it.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.text = ""  # what has been reported so far

    def push(self, token_id: int) -> tuple[int, str] | None:
        """Add one token; returns ``(offset, delta)`` when the text changed (the text is now
        ``old[:offset] + delta``), or None when there is nothing new to show yet."""
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if text.endswith(REPLACEMENT_CHARACTER):
            return None
        change = text_change(self.text, text)
        if change is not None:
            self.text = text
        return change

    def final_text(self) -> str:
        """Everything decoded, an incomplete last character included."""
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=True)


def text_change(old: str, new: str) -> tuple[int, str] | None:
    """``(offset, delta)`` with ``new == old[:offset] + delta``, the offset as large as it can be;
    None when the texts are equal."""
    if old == new:
        return None
    offset = _common_prefix_length(old, new)
    return offset, new[offset:]


def _common_prefix_length(a: str, b: str) -> int:
    length = min(len(a), len(b))
    if a[:length] == b[:length]:
        return length
    for index in range(length):
        if a[index] != b[index]:
            return index
    return length
