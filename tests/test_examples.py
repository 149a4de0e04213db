"""Tokenization and loss masks: which tokens the model reads and which it is trained on."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from splitcore.data.examples import (
    IGNORE_INDEX,
    NO_CHAT_TEMPLATE,
    TokenizedExample,
    TokenStats,
    preview_segments,
    token_stats,
    tokenize_example,
    tokenize_examples,
    uses_chat_template,
)
from splitcore.data.formats import ChatExample, ChatMessage, PromptCompletionExample, TextExample
from splitcore.model.tiny_models import EOS_TOKEN, IM_END

SYSTEM = ChatMessage("system", "Answer briefly.")
USER_1 = ChatMessage("user", "What is the capital of France?")
ANSWER_1 = ChatMessage("assistant", "The capital of France is Paris.")
USER_2 = ChatMessage("user", "And numbers?")
ANSWER_2 = ChatMessage("assistant", "0 1 2 3")


@pytest.fixture
def tokenizer(tiny_dirs):
    """A fresh tiny tokenizer (tests may change its template or eos)."""
    return AutoTokenizer.from_pretrained(tiny_dirs["llama"])


def trained_runs(tokenizer, tokenized: TokenizedExample) -> list[str]:
    return [text for text, trained in preview_segments(tokenizer, tokenized) if trained]


def trained_ids(tokenized: TokenizedExample) -> list[int]:
    return [label for label in tokenized.labels if label != IGNORE_INDEX]


# --- text -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_text_is_fully_trained_and_ends_with_eos(tiny_dirs, arch):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs[arch])
    text = "The quick brown fox jumps over the lazy dog."
    tokenized = tokenize_example(tokenizer, TextExample(text), max_length=512)
    expected = [*tokenizer(text).input_ids, tokenizer.eos_token_id]
    assert tokenized.input_ids == tuple(expected)
    assert tokenized.labels == tuple(expected)
    assert tokenized.full_length == len(expected)
    assert not tokenized.truncated
    assert tokenized.num_trained_tokens == len(expected) - 1  # position 0 is never predicted
    assert tokenizer.decode(tokenized.input_ids, skip_special_tokens=False) == text + EOS_TOKEN


def test_text_already_ending_with_eos_gets_no_second_one(tokenizer):
    tokenized = tokenize_example(tokenizer, TextExample("Paris" + EOS_TOKEN), max_length=64)
    assert tokenized.input_ids == (*tokenizer("Paris").input_ids, tokenizer.eos_token_id)


def test_without_an_eos_token_nothing_is_appended(tokenizer):
    tokenizer.eos_token = None
    assert tokenizer.eos_token_id is None
    tokenized = tokenize_example(tokenizer, TextExample("Paris"), max_length=64)
    assert tokenized.input_ids == tuple(tokenizer("Paris").input_ids)
    # With the chat template the turn ends with the template's end-of-turn tokens, eos or not.
    chat = tokenize_example(tokenizer, PromptCompletionExample("Q: ", "Paris"), max_length=64)
    assert tokenizer.decode(trained_ids(chat), skip_special_tokens=False) == "Paris" + IM_END + "\n"
    tokenizer.chat_template = None
    completion = tokenize_example(tokenizer, PromptCompletionExample("Q: ", "Paris"), max_length=64)
    assert trained_ids(completion) == tokenizer("Paris").input_ids


# --- prompt / completion --------------------------------------------------------------


def chat_turns(prompt: str, completion: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


@pytest.mark.parametrize("kind,with_template,without_template", [
    ("text", False, False), ("prompt_completion", True, False), ("messages", True, True),
])
def test_uses_chat_template_by_kind_and_tokenizer(tokenizer, kind, with_template, without_template):
    assert uses_chat_template(tokenizer, kind) is with_template
    tokenizer.chat_template = None
    # "messages" stays True: such rows cannot train without a template, and say so.
    assert uses_chat_template(tokenizer, kind) is without_template


def test_with_a_chat_template_prompt_and_completion_are_a_user_and_an_assistant_turn(tokenizer):
    example = PromptCompletionExample(prompt="What is the capital of France?", completion="The capital is Paris.")
    tokenized = tokenize_example(tokenizer, example, max_length=512)
    rendered = tokenizer.apply_chat_template(chat_turns(example.prompt, example.completion), tokenize=False)
    assert rendered == ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                        "<|im_start|>assistant\nThe capital is Paris.<|im_end|>\n")
    assert tokenized.input_ids == tuple(tokenizer(rendered, add_special_tokens=False).input_ids)
    assert tokenizer.decode(tokenized.input_ids, skip_special_tokens=False) == rendered
    # Trained: exactly the completion and the end of its turn, one run at the end; no end-of-sequence token.
    end_of_turn = IM_END + "\n"
    trained = tokenizer(example.completion + end_of_turn, add_special_tokens=False).input_ids
    context = len(tokenized.input_ids) - len(trained)
    assert tokenized.input_ids[context:] == tuple(trained)
    assert tokenized.labels == (*[IGNORE_INDEX] * context, *trained)
    assert tokenized.num_trained_tokens == len(trained)
    assert tokenizer.eos_token_id not in tokenized.input_ids
    assert preview_segments(tokenizer, tokenized) == [
        ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n", False),
        ("The capital is Paris." + end_of_turn, True),
    ]
    # The same pair written as a chat row trains on the same tokens.
    as_chat = ChatExample((ChatMessage("user", example.prompt), ChatMessage("assistant", example.completion)))
    assert tokenize_example(tokenizer, as_chat, max_length=512) == tokenized


def test_with_a_chat_template_an_empty_prompt_is_an_empty_user_turn(tokenizer):
    tokenized = tokenize_example(tokenizer, PromptCompletionExample("", "hello there"), max_length=64)
    assert tokenizer.decode(tokenized.input_ids, skip_special_tokens=False) == (
        tokenizer.apply_chat_template(chat_turns("", "hello there"), tokenize=False))
    assert trained_runs(tokenizer, tokenized) == ["hello there<|im_end|>\n"]


def test_without_a_chat_template_prompt_is_masked_and_completion_plus_eos_is_trained(tokenizer):
    tokenizer.chat_template = None
    example = PromptCompletionExample(prompt="Question: What is the capital of France? Answer: ", completion="Paris")
    tokenized = tokenize_example(tokenizer, example, max_length=512)
    prompt_ids = tokenizer(example.prompt, add_special_tokens=True).input_ids
    completion_ids = tokenizer(example.completion, add_special_tokens=False).input_ids
    assert tokenized.input_ids == (*prompt_ids, *completion_ids, tokenizer.eos_token_id)
    assert tokenized.labels == (*[IGNORE_INDEX] * len(prompt_ids), *completion_ids, tokenizer.eos_token_id)
    # The boundary is exact: neither part leaks into the other.
    assert tokenizer.decode(trained_ids(tokenized), skip_special_tokens=False) == "Paris" + EOS_TOKEN
    assert tokenizer.decode(tokenized.input_ids[: len(prompt_ids)]) == example.prompt
    assert tokenized.num_trained_tokens == len(completion_ids) + 1
    assert preview_segments(tokenizer, tokenized) == [(example.prompt, False), ("Paris" + EOS_TOKEN, True)]
    assert IM_END not in tokenizer.decode(tokenized.input_ids, skip_special_tokens=False)


def test_without_a_chat_template_an_empty_prompt_trains_everything(tokenizer):
    tokenizer.chat_template = None
    tokenized = tokenize_example(tokenizer, PromptCompletionExample("", "hello there"), max_length=64)
    assert tokenized.labels == tokenized.input_ids
    assert tokenizer.decode(tokenized.input_ids, skip_special_tokens=False) == "hello there" + EOS_TOKEN


# --- chat messages --------------------------------------------------------------------


def test_only_assistant_turns_are_trained(tokenizer):
    example = ChatExample((SYSTEM, USER_1, ANSWER_1, USER_2, ANSWER_2))
    tokenized = tokenize_example(tokenizer, example, max_length=512)
    rendered = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in example.messages], tokenize=False
    )
    assert tokenized.input_ids == tuple(tokenizer(rendered, add_special_tokens=False).input_ids)
    assert preview_segments(tokenizer, tokenized) == [
        ("<|im_start|>system\nAnswer briefly.<|im_end|>\n"
         "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n", False),
        ("The capital of France is Paris.<|im_end|>\n", True),
        ("<|im_start|>user\nAnd numbers?<|im_end|>\n<|im_start|>assistant\n", False),
        ("0 1 2 3<|im_end|>\n", True),
    ]
    trained = [label for label in tokenized.labels[1:] if label != IGNORE_INDEX]
    assert tokenized.num_trained_tokens == len(trained)
    assert tokenizer.convert_tokens_to_ids(IM_END) in trained


def test_system_then_assistant(tokenizer):
    tokenized = tokenize_example(tokenizer, ChatExample((SYSTEM, ANSWER_2)), max_length=64)
    assert trained_runs(tokenizer, tokenized) == ["0 1 2 3<|im_end|>\n"]


def test_a_model_without_a_chat_template_rejects_messages(tokenizer):
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match=f"^{NO_CHAT_TEMPLATE}$"):
        tokenize_example(tokenizer, ChatExample((USER_1, ANSWER_1)), max_length=64)
    assert NO_CHAT_TEMPLATE == "this model has no chat template; use text or prompt/completion rows"
    # Text still works with such a model.
    assert tokenize_example(tokenizer, TextExample("hi"), max_length=64).full_length > 0


def test_a_template_whose_prefixes_do_not_match_is_refused(tokenizer):
    # Rendering depends on the whole conversation (its length), so a shorter render is no prefix.
    tokenizer.chat_template = (
        "{{ messages | length }} turns\n{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    with pytest.raises(ValueError, match=r"^this model's chat template cannot mark assistant turns: the conversation "
                                         r"up to message 2 does not render as the start of the whole conversation"):
        tokenize_example(tokenizer, ChatExample((USER_1, ANSWER_1)), max_length=64)


def test_a_template_that_raises_becomes_a_value_error(tokenizer):
    tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(ValueError, match="^this model's chat template rejected the conversation: Conversation roles"):
        tokenize_example(tokenizer, ChatExample((USER_1, ANSWER_1)), max_length=64)


def test_a_leading_assistant_message_is_refused(tokenizer):
    with pytest.raises(ValueError, match="^the conversation starts with an assistant message"):
        tokenize_example(tokenizer, ChatExample((ANSWER_1, USER_1, ANSWER_2)), max_length=64)


@pytest.mark.default_model
def test_default_model_trains_assistant_turns_only(default_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    example = ChatExample((USER_1, ANSWER_1, USER_2, ANSWER_2))
    tokenized = tokenize_example(tokenizer, example, max_length=4096)
    segments = preview_segments(tokenizer, tokenized)
    assert [text for text, trained in segments if trained] == [
        "The capital of France is Paris.<|im_end|>\n", "0 1 2 3<|im_end|>\n",
    ]
    untrained = "".join(text for text, trained in segments if not trained)
    # SmolLM2's template adds its own system prompt when the conversation has none.
    assert untrained.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in untrained
    assert untrained.endswith("<|im_start|>user\nAnd numbers?<|im_end|>\n<|im_start|>assistant\n")
    assert "".join(text for text, _ in segments) == tokenizer.decode(tokenized.input_ids, skip_special_tokens=False)


@pytest.mark.default_model
def test_default_model_trains_prompt_completion_as_a_chat_turn(default_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    assert uses_chat_template(tokenizer, "prompt_completion")
    tokenized = tokenize_example(tokenizer, PromptCompletionExample(USER_1.content, ANSWER_1.content), 4096)
    rendered = tokenizer.apply_chat_template(chat_turns(USER_1.content, ANSWER_1.content), tokenize=False)
    assert tokenizer.decode(tokenized.input_ids, skip_special_tokens=False) == rendered
    assert trained_runs(tokenizer, tokenized) == ["The capital of France is Paris.<|im_end|>\n"]


# --- truncation -----------------------------------------------------------------------


def test_truncation_cuts_on_the_right_and_keeps_the_full_length(tokenizer):
    example = PromptCompletionExample("Split learning keeps ", "the data with its owner.")
    full = tokenize_example(tokenizer, example, max_length=512)
    cut = tokenize_example(tokenizer, example, max_length=len(full.input_ids) - 2)
    assert cut.input_ids == full.input_ids[:-2]
    assert cut.labels == full.labels[:-2]
    assert cut.input_ids[-1] != tokenizer.eos_token_id
    assert (cut.full_length, cut.truncated) == (full.full_length, True)
    assert cut.num_trained_tokens == full.num_trained_tokens - 2
    exact = tokenize_example(tokenizer, example, max_length=full.full_length)
    assert exact == full and not exact.truncated


def test_truncation_can_leave_nothing_to_train(tokenizer):
    example = PromptCompletionExample("Split learning keeps the data with its owner.", "yes")
    tokenized = tokenize_example(tokenizer, example, max_length=2)
    assert len(tokenized.input_ids) == 2
    assert tokenized.labels == (IGNORE_INDEX, IGNORE_INDEX)
    assert tokenized.num_trained_tokens == 0


@pytest.mark.parametrize("max_length,message", [
    (1, "max_length must be at least 2 (one token to read, one to predict), got 1"),
    (0, "max_length must be at least 2 (one token to read, one to predict), got 0"),
    (8.0, "max_length must be an integer, got 8.0"),
    (True, "max_length must be an integer, got True"),
])
def test_max_length_must_be_at_least_two(tokenizer, max_length, message):
    with pytest.raises(ValueError) as caught:
        tokenize_example(tokenizer, TextExample("hello"), max_length=max_length)
    assert str(caught.value) == message


def test_tokenize_examples_keeps_the_order(tokenizer):
    examples = [TextExample("hello"), TextExample("hello there"), TextExample("hi")]
    tokenized = tokenize_examples(tokenizer, examples, max_length=64)
    assert tokenized == [tokenize_example(tokenizer, example, 64) for example in examples]


# --- TokenizedExample and statistics --------------------------------------------------


def test_tokenized_example_checks_its_shape():
    with pytest.raises(ValueError, match="^3 input ids but 2 labels$"):
        TokenizedExample(input_ids=(1, 2, 3), labels=(1, 2), full_length=3)
    with pytest.raises(ValueError, match="^full_length 2 is shorter than the 3 input ids$"):
        TokenizedExample(input_ids=(1, 2, 3), labels=(1, 2, 3), full_length=2)


def test_num_trained_tokens_skips_position_zero():
    example = TokenizedExample(input_ids=(5, 6, 7, 8), labels=(5, IGNORE_INDEX, 7, 8), full_length=4)
    assert example.num_trained_tokens == 2


def make(length: int, trained: int, max_length: int = 4) -> TokenizedExample:
    kept = min(length, max_length)
    labels = tuple([IGNORE_INDEX] * (kept - trained) + list(range(trained)))
    return TokenizedExample(input_ids=tuple(range(kept)), labels=labels, full_length=length)


def test_token_stats():
    tokenized = [make(3, 2), make(4, 4), make(10, 4), make(6, 1)]
    assert [t.num_trained_tokens for t in tokenized] == [2, 3, 3, 1]
    assert token_stats(tokenized, max_length=4) == TokenStats(
        examples=4, min_tokens=3, median_tokens=5, max_tokens=10, total_tokens=23, trained_tokens=9, truncated=2,
        max_length=4,
    )
    odd = token_stats(tokenized[:3], max_length=4)
    assert (odd.median_tokens, odd.truncated, odd.total_tokens) == (4, 1, 17)
    assert token_stats(tokenized, max_length=10).truncated == 0


def test_token_stats_needs_examples():
    with pytest.raises(ValueError, match="no tokenized examples"):
        token_stats([], max_length=8)


def test_token_stats_on_real_tokenization(tokenizer):
    tokenized = tokenize_examples(tokenizer, [TextExample("hi"), TextExample("hello there, how are you today?")], 6)
    stats = token_stats(tokenized, max_length=6)
    assert stats.max_tokens == tokenized[1].full_length > 6
    assert stats.truncated == 1
    assert stats.trained_tokens == tokenized[0].num_trained_tokens + 5


# --- preview --------------------------------------------------------------------------


def test_preview_segments_alternate_and_round_trip(tokenizer):
    example = ChatExample((SYSTEM, USER_1, ANSWER_1, USER_2, ANSWER_2))
    for tokenized in [
        tokenize_example(tokenizer, example, max_length=512),
        tokenize_example(tokenizer, example, max_length=30),
        tokenize_example(tokenizer, TextExample("hello there"), max_length=512),
    ]:
        segments = preview_segments(tokenizer, tokenized)
        assert "".join(text for text, _ in segments) == tokenizer.decode(tokenized.input_ids, skip_special_tokens=False)
        flags = [trained for _, trained in segments]
        assert all(a != b for a, b in zip(flags, flags[1:]))
    assert preview_segments(tokenizer, tokenized) == [("hello there" + EOS_TOKEN, True)]
