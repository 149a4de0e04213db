"""Tiny randomly initialised models with a real tokenizer, for tests and quick demos.

Nothing is downloaded: the byte-level BPE tokenizer is trained on a short built-in
text, so it encodes any UTF-8 string, and the weights come from a fixed seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
)

TINY_ARCHS = ("gpt2", "llama", "qwen3", "gemma2", "gemma3", "phi3")

# Small enough that the test sentences run past it, so sliding-window masks and caches really cut.
TINY_SLIDING_WINDOW = 6
# Local and global layers mixed, so every part of a 2/2/2 split builds both kinds of mask.
TINY_LAYER_PATTERN = ("sliding_attention", "full_attention")
# Soft-caps near the tiny Gemmas' own magnitudes (attention scores up to ~0.07, logits up to
# ~0.6 at seed 0), so capping really bends them; the released models use 50 and 30.
TINY_ATTN_SOFTCAP = 0.05
TINY_FINAL_SOFTCAP = 0.5

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN, IM_START, IM_END]

# ChatML, as used by SmolLM2 and Qwen2: loss masking and the playground rely on it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = """
Split learning keeps the data with its owner. The first layers and the last layers of
the model run on the owner's machine; the middle of the network runs on a server with a
large accelerator. Only hidden states and their gradients travel between the two.
A low-rank adapter adds two small matrices next to a frozen weight. Training changes the
small matrices and leaves the base model untouched, so one base model serves many users.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Question: What is the capital of France? Answer: The capital of France is Paris.
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000, punctuation . , ; : ! ? ' " ( ) [ ] { } - _ / \\
user assistant system: hello, how are you today? I am fine, thank you for asking.
"""


@dataclass(frozen=True)
class TinyModelSpec:
    """Size of a tiny model. Defaults give ~0.3M parameters and six layers to split."""

    arch: str = "llama"
    num_layers: int = 6
    hidden_size: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 512
    max_positions: int = 512
    tie_word_embeddings: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in TINY_ARCHS:
            raise ValueError(f"unknown tiny architecture {self.arch!r}; choose one of {', '.join(TINY_ARCHS)}")
        if self.num_layers < 3:
            raise ValueError(f"num_layers must be at least 3 to split in three, got {self.num_layers}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be divisible by num_kv_heads {self.num_kv_heads}")
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} for a byte-level tokenizer")


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the built-in text, with a ChatML template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        additional_special_tokens=[IM_START, IM_END],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _gpt2(spec: TinyModelSpec, common: dict) -> PretrainedConfig:
    return GPT2Config(
        n_layer=spec.num_layers,
        n_embd=spec.hidden_size,
        n_head=spec.num_heads,
        n_inner=spec.intermediate_size,
        n_positions=spec.max_positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **common,
    )


def _decoder(spec: TinyModelSpec, common: dict) -> dict:
    """The sizes every Llama-like config spells the same way."""
    return dict(
        num_hidden_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_positions,
        **common,
    )


def _layer_types(spec: TinyModelSpec) -> list[str]:
    return [TINY_LAYER_PATTERN[i % len(TINY_LAYER_PATTERN)] for i in range(spec.num_layers)]


def _llama(spec: TinyModelSpec, common: dict) -> PretrainedConfig:
    return LlamaConfig(**_decoder(spec, common))


def _qwen3(spec: TinyModelSpec, common: dict) -> PretrainedConfig:
    return Qwen3Config(head_dim=spec.hidden_size // spec.num_heads, use_sliding_window=True,
                       sliding_window=TINY_SLIDING_WINDOW, layer_types=_layer_types(spec), **_decoder(spec, common))


def _gemma(spec: TinyModelSpec) -> dict:
    head_dim = spec.hidden_size // spec.num_heads
    return dict(head_dim=head_dim, sliding_window=TINY_SLIDING_WINDOW, layer_types=_layer_types(spec),
                # Not head_dim, so a split that fell back to 1/sqrt(head_dim) would show.
                query_pre_attn_scalar=2 * head_dim, final_logit_softcapping=TINY_FINAL_SOFTCAP)


def _gemma2(spec: TinyModelSpec, common: dict) -> PretrainedConfig:
    return Gemma2Config(attn_logit_softcapping=TINY_ATTN_SOFTCAP, **_gemma(spec), **_decoder(spec, common))


def _gemma3(spec: TinyModelSpec, common: dict) -> PretrainedConfig:
    # Local and global layers rotate with different base frequencies, as in the released models.
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}}
    return Gemma3TextConfig(rope_parameters=rope, **_gemma(spec), **_decoder(spec, common))


def _phi3(spec: TinyModelSpec, common: dict) -> PretrainedConfig:
    # Phi-3 has no layer types: with a window set, every layer slides.
    return Phi3Config(sliding_window=TINY_SLIDING_WINDOW, original_max_position_embeddings=spec.max_positions,
                      resid_pdrop=0.0, embd_pdrop=0.0, **_decoder(spec, common))


_CONFIG_BUILDERS = {"gpt2": _gpt2, "llama": _llama, "qwen3": _qwen3, "gemma2": _gemma2, "gemma3": _gemma3,
                    "phi3": _phi3}


def tiny_config(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    """The config of ``spec.arch`` at this size, with the family's distinctive features switched on."""
    common = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=spec.tie_word_embeddings,
    )
    return _CONFIG_BUILDERS[spec.arch](spec, common)


def build_tiny_model(spec: TinyModelSpec) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    tokenizer = build_tokenizer(spec.vocab_size)
    config = tiny_config(spec, tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def write_tiny_model(out_dir: str | Path, spec: TinyModelSpec) -> Path:
    """Write a tiny model and its tokenizer as a normal model directory."""
    out = Path(out_dir)
    model, tokenizer = build_tiny_model(spec)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
