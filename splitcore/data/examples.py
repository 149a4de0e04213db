"""Examples turned into token ids and labels, exactly as the model trains on them.

Labels follow the Hugging Face convention: a label equal to the input id at the same
position means "predict this token", ``IGNORE_INDEX`` means no loss there. The model
shifts labels by one, so the label at position 0 never contributes to the loss.

* text: every token is trained, and the tokenizer's end-of-sequence token is appended
  so the model learns to stop.
* prompt/completion: the prompt is context only; the completion and the end-of-sequence
  token are trained. When the model's tokenizer has a chat template, the pair is a
  conversation of one user turn (the prompt) and one assistant turn (the completion),
  rendered with the template, so a chat model trains in the format it is asked in
  (``uses_chat_template``); without one, prompt and completion are joined as they are.
* messages: rendered with the model's chat template; only the assistant turns (their
  content and the template's end-of-turn tokens) are trained.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from jinja2 import TemplateError

from splitcore.data.formats import ChatExample, ChatMessage, Example, PromptCompletionExample, TextExample

IGNORE_INDEX = -100

NO_CHAT_TEMPLATE = "this model has no chat template; use text or prompt/completion rows"

TokenIds = list[int]


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE_INDEX where there is no loss
    full_length: int  # tokens before truncation

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"{len(self.input_ids)} input ids but {len(self.labels)} labels")
        if self.full_length < len(self.input_ids):
            raise ValueError(f"full_length {self.full_length} is shorter than the {len(self.input_ids)} input ids")

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)

    @property
    def num_trained_tokens(self) -> int:
        """Tokens that contribute to the loss (position 0 never does: labels shift by one)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


@dataclass(frozen=True)
class TokenStats:
    examples: int
    min_tokens: int
    median_tokens: float
    max_tokens: int
    total_tokens: int  # before truncation
    trained_tokens: int  # after truncation: what the loss will actually cover
    truncated: int  # examples longer than max_length
    max_length: int


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def uses_chat_template(tokenizer, kind: str) -> bool:
    """Whether examples of ``kind`` train through the tokenizer's chat template: chat messages always,
    prompt/completion pairs when the tokenizer has a template, plain text never. A model trained this
    way should be asked with the template too."""
    return kind == "messages" or (kind == "prompt_completion" and has_chat_template(tokenizer))


def tokenize_example(tokenizer, example: Example, max_length: int) -> TokenizedExample:
    """Token ids and labels for one example, cut on the right to ``max_length`` tokens."""
    _check_max_length(max_length)
    input_ids, labels = _TOKENIZERS[example.kind](tokenizer, example)
    return TokenizedExample(
        input_ids=tuple(input_ids[:max_length]), labels=tuple(labels[:max_length]), full_length=len(input_ids)
    )


def tokenize_examples(tokenizer, examples: Sequence[Example], max_length: int) -> list[TokenizedExample]:
    return [tokenize_example(tokenizer, example, max_length) for example in examples]


def token_stats(tokenized: Sequence[TokenizedExample], max_length: int) -> TokenStats:
    """Length statistics over the untruncated examples, for choosing ``max_length``."""
    if not tokenized:
        raise ValueError("no tokenized examples to summarise")
    lengths = [example.full_length for example in tokenized]
    return TokenStats(
        examples=len(lengths),
        min_tokens=min(lengths),
        median_tokens=statistics.median(lengths),
        max_tokens=max(lengths),
        total_tokens=sum(lengths),
        trained_tokens=sum(example.num_trained_tokens for example in tokenized),
        truncated=sum(length > max_length for length in lengths),
        max_length=max_length,
    )


def preview_segments(tokenizer, tokenized: TokenizedExample) -> list[tuple[str, bool]]:
    """The example as the model sees it, as runs of (text, trained), special tokens included."""
    runs = itertools.groupby(
        zip(tokenized.input_ids, tokenized.labels), key=lambda pair: pair[1] != IGNORE_INDEX
    )
    return [
        (tokenizer.decode([token for token, _ in run], skip_special_tokens=False), trained)
        for trained, run in runs
    ]


def _check_max_length(max_length: int) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise ValueError(f"max_length must be an integer, got {max_length!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (one token to read, one to predict), got {max_length}")


def _encode(tokenizer, text: str, *, add_special_tokens: bool) -> TokenIds:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _with_eos(tokenizer, ids: TokenIds) -> TokenIds:
    eos = tokenizer.eos_token_id
    if eos is None or (ids and ids[-1] == eos):
        return ids
    return [*ids, eos]


def _tokenize_text(tokenizer, example: TextExample) -> tuple[TokenIds, TokenIds]:
    ids = _with_eos(tokenizer, _encode(tokenizer, example.text, add_special_tokens=True))
    return ids, list(ids)


def _tokenize_prompt_completion(tokenizer, example: PromptCompletionExample) -> tuple[TokenIds, TokenIds]:
    if has_chat_template(tokenizer):
        turns = (ChatMessage(role="user", content=example.prompt),
                 ChatMessage(role="assistant", content=example.completion))
        return _tokenize_messages(tokenizer, ChatExample(messages=turns))
    # Two separate calls, so the prompt/completion boundary falls exactly between tokens.
    prompt = _encode(tokenizer, example.prompt, add_special_tokens=True)
    completion = _with_eos(tokenizer, _encode(tokenizer, example.completion, add_special_tokens=False))
    return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion


def _tokenize_messages(tokenizer, example: ChatExample) -> tuple[TokenIds, TokenIds]:
    if not has_chat_template(tokenizer):
        raise ValueError(NO_CHAT_TEMPLATE)
    messages = [{"role": message.role, "content": message.content} for message in example.messages]
    rendered = _render(tokenizer, messages)
    spans = [
        _assistant_span(tokenizer, messages, index, rendered)
        for index, message in enumerate(messages)
        if message["role"] == "assistant"
    ]
    encoding = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    # A token is trained when its first character lies inside an assistant span.
    labels = [
        token if any(start <= offset[0] < end for start, end in spans) else IGNORE_INDEX
        for token, offset in zip(ids, encoding["offset_mapping"])
    ]
    return ids, labels


def _assistant_span(tokenizer, messages: list[dict], index: int, rendered: str) -> tuple[int, int]:
    """Character range of assistant message ``index`` in ``rendered``: from after the
    generation prompt that precedes it to the end of its turn (end-of-turn tokens included)."""
    if index == 0:
        raise ValueError(
            "the conversation starts with an assistant message; the chat template cannot render what comes "
            "before it, so start with a system or user message"
        )
    before = _render(tokenizer, messages[:index], add_generation_prompt=True)
    through = _render(tokenizer, messages[: index + 1])
    if not (rendered.startswith(before) and rendered.startswith(through) and len(before) <= len(through)):
        raise ValueError(
            f"this model's chat template cannot mark assistant turns: the conversation up to message {index + 1} "
            "does not render as the start of the whole conversation, so the assistant's part cannot be located; "
            "use text or prompt/completion rows with this model"
        )
    return len(before), len(through)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:
        raise ValueError(f"this model's chat template rejected the conversation: {exc}") from exc


_TOKENIZERS: dict[str, Callable[..., tuple[TokenIds, TokenIds]]] = {
    "text": _tokenize_text,
    "prompt_completion": _tokenize_prompt_completion,
    "messages": _tokenize_messages,
}
