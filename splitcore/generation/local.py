"""Local text generation with the unsplit model, optionally with a PEFT adapter."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, TextStreamer


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode: greedy when ``temperature`` is 0, else sampling with ``top_p``."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or not (
            1 <= self.max_new_tokens <= 4096
        ):
            raise ValueError(f"max_new_tokens must be an integer from 1 to 4096, got {self.max_new_tokens!r}")
        if not 0.0 <= self.temperature <= 10.0:
            raise ValueError(f"temperature must be between 0 (greedy) and 10, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def _require_model_dir(path: str | os.PathLike, what: str, marker: str) -> Path:
    directory = Path(path)
    if not (directory / marker).is_file():
        raise FileNotFoundError(f"{what} directory {directory} has no {marker}")
    return directory


def load_for_inference(
    model_dir: str | os.PathLike, adapter_dir: str | os.PathLike | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The unsplit base model (with the adapter loaded by ``peft`` if given) in eval mode."""
    model_path = _require_model_dir(model_dir, "model", "config.json")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    if adapter_dir is not None:
        from peft import PeftModel

        adapter_path = _require_model_dir(adapter_dir, "adapter", "adapter_config.json")
        model = PeftModel.from_pretrained(model, adapter_path)
    model.eval()
    return model, tokenizer


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool) -> torch.Tensor:
    """Prompt -> (1, seq) token ids; with ``chat`` the tokenizer's chat template is applied."""
    if chat:
        if not tokenizer.chat_template:
            raise ValueError("--chat needs a tokenizer with a chat template, and this model has none")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(prompt, return_tensors="pt").input_ids


@torch.no_grad()
def generate_text(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    settings: GenerationSettings = GenerationSettings(),
    chat: bool = False,
    stream: bool = False,
) -> str:
    """Generate a continuation of ``prompt`` and return only the new text."""
    input_ids = encode_prompt(tokenizer, prompt, chat)
    sampling = settings.temperature > 0
    kwargs = dict(max_new_tokens=settings.max_new_tokens, do_sample=sampling)
    if sampling:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
        torch.manual_seed(settings.seed)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if tokenizer.pad_token_id is not None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    output = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **kwargs
    )
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
