"""A merged model: a base model with an exported PEFT adapter folded into its weights.

The result is an ordinary model directory (safetensors weights, ``config.json``,
``generation_config.json`` and the tokenizer) that loads with
``AutoModelForCausalLM.from_pretrained`` alone, without peft, and serves with any tool that
reads HuggingFace models. The folding is peft's own ``merge_and_unload()``, so every adapter
type whose layers peft can merge works the same way: LoRA (with DoRA or rsLoRA), LoHa, LoKr,
IA3 and the others.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

ADAPTER_CONFIG = "adapter_config.json"
# The one weights file of a merged model (transformers writes safetensors only; a model past the
# shard size gets model-0000N-of-0000M.safetensors and an index instead).
MODEL_WEIGHTS = "model.safetensors"


class MergeError(ValueError):
    """The adapter cannot be merged into the base model; the message says why and what to do."""


def merged_model(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike) -> PreTrainedModel:
    """The base model of ``base_dir`` with the adapter of ``adapter_dir`` merged in, in the base's dtype."""
    base_dir, adapter_dir = Path(base_dir), Path(adapter_dir)
    if not (base_dir / "config.json").is_file():
        raise MergeError(f"{base_dir} is not a model directory (it has no config.json)")
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise MergeError(f"{adapter_dir} is not a PEFT adapter directory (it has no {ADAPTER_CONFIG})")
    config = PeftConfig.from_pretrained(adapter_dir)
    if config.is_prompt_learning:
        raise MergeError(f"a {config.peft_type} adapter adds virtual tokens, not weights: it cannot be merged "
                         "into the model; load it with PeftModel.from_pretrained instead")
    # "auto": the dtype of the base's config (or of its weights), so the merged model is stored as the base is.
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    try:
        adapted = PeftModel.from_pretrained(base, adapter_dir)
    except (RuntimeError, ValueError, KeyError) as exc:  # shapes or module names of another model
        raise MergeError(f"the adapter in {adapter_dir} does not fit the base model in {base_dir}: {exc}") from exc
    # Adapter layers compute their update in their own (fp32) dtype and add it to the base layer's weight in
    # the weight's dtype: the merged weights keep the base's dtype.
    merged = adapted.merge_and_unload()
    merged.eval()
    return merged


def merge_adapter(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike,
                  out_dir: str | os.PathLike) -> Path:
    """Write the merged model and the base's tokenizer as a new model directory ``out_dir``.

    Everything is written to a staging directory beside ``out_dir`` and renamed at the end, so a
    crash (or a full disk) leaves either the whole directory or nothing. ``out_dir`` must not exist.
    """
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists already: merge into a new directory, or remove it first")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)  # before the merge: a base without one fails at once
    model = merged_model(base_dir, adapter_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        # transformers 5 always writes safetensors (save_pretrained has no pickle format any more),
        # with config.json and, for a model that generates, generation_config.json.
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
