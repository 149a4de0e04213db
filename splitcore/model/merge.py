"""A merged model: a base model with an exported PEFT adapter folded into its weights, shard by shard.

The result is an ordinary model directory (safetensors weights in the base checkpoint's dtype,
``config.json``, ``generation_config.json`` and the tokenizer) that loads with
``AutoModelForCausalLM.from_pretrained`` alone, without peft, and serves with any tool that
reads HuggingFace models. The folding is peft's own ``merge_and_unload()``, so every adapter
type whose layers peft can merge works the same way: LoRA (with DoRA or rsLoRA), LoHa, LoKr,
IA3 and the others.

The base model is never loaded whole: a merge needs about one output shard's worth of memory
(5 GB by default), not the model's size. How:

1. peft loads the adapter onto a skeleton of the base model on the meta device (modules and
   shapes, no weights), exactly as it would onto the real model: that finds the modules the
   adapter adapts and checks that the adapter fits, before a byte of the base is read.
2. The base checkpoint's safetensors files (one ``model.safetensors``, or the shards listed by
   ``model.safetensors.index.json``) are opened one at a time and read tensor by tensor.
   A tensor of a module the adapter leaves alone is copied as it is. The tensors of an adapted
   module (one projection's weight and bias) go into a copy of that one module, peft wraps it
   with the adapter's weights for it (under the module's full path, so the adapter's keys
   match) and merges them with ``merge_and_unload()``.
3. The tensors collect into the output shard being filled, which is written and dropped before
   the next tensor would take it past ``max_shard_size``.

Memory held at once while the base is read: the adapter's weights, the output shard being
filled (at most ``max_shard_size``, or one tensor bigger than that), the one adapted module
being merged (its weights, including those read so far when they straddle two input shards,
and peft's temporaries of the size of its weight), and weightless (meta) copies of the adapted
modules. Input files are memory-mapped by safetensors and read a tensor at a time.

The output keeps the base checkpoint's tensor names and dtypes. Its weights are one
``model.safetensors`` when they fit one shard, else ``model-0000i-of-0000N.safetensors`` with a
``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``), as transformers
writes them. A base that ties its LM head to its input embeddings stores one tensor for both
and so does the merged model; an adapter that changes that shared tensor is refused (merging it
would change both ends of the model).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import load_peft_weights
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PretrainedConfig

from splitcore.model.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint, CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
# The one weights file of a merged model that fits one shard; past that, shards and an index.
MODEL_WEIGHTS = SINGLE_FILE
MODEL_INDEX = INDEX_FILE
SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"
GENERATION_CONFIG = "generation_config.json"
# The Hub's shard size (transformers 5 itself defaults to 50GB, too much to hold while writing).
MAX_SHARD_SIZE = "5GB"
# Units of a shard size as transformers and the Hub read them ("5GB", "200KB"): decimal.
_SIZE_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3}
# A saved adapter's keys are this, then the module path in the full model, then the adapter weight's name.
_ADAPTER_KEY_PREFIX = "base_model.model."


class MergeError(ValueError):
    """The adapter cannot be merged into the base model; the message says why and what to do."""


def merge_adapter(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  max_shard_size: int | str = MAX_SHARD_SIZE) -> Path:
    """Write the merged model and the base's tokenizer as a new model directory ``out_dir``.

    Streams the base checkpoint shard by shard (see the module docstring for what is held at
    once); output shards hold at most ``max_shard_size`` (bytes, or "5GB", "200KB"). Everything
    is written to a staging directory beside ``out_dir`` and renamed at the end, so a crash (or
    a full disk) leaves either the whole directory or nothing. ``out_dir`` must not exist.
    """
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists already: merge into a new directory, or remove it first")
    base_dir, adapter_dir = Path(base_dir), Path(adapter_dir)
    _check_mergeable(base_dir, adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)  # before the merge: a base without one fails at once
    config = AutoConfig.from_pretrained(base_dir)
    checkpoint = _base_checkpoint(base_dir)
    modules = AdaptedModules.find(config, base_dir, adapter_dir, checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        writer = ShardWriter(staging, max_shard_size)
        for name, tensor in modules.merged_tensors(checkpoint):
            writer.add(name, tensor)
        writer.finish()
        if getattr(config, "dtype", None) is None and writer.float_dtype is not None:
            config.dtype = writer.float_dtype  # as from_pretrained(dtype="auto") would have recorded it
        config.save_pretrained(staging)
        if (base_dir / GENERATION_CONFIG).is_file():
            GenerationConfig.from_pretrained(base_dir).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _check_mergeable(base_dir: Path, adapter_dir: Path) -> None:
    """MergeError when either directory is not what it should be, or the adapter is of a kind this cannot merge."""
    if not (base_dir / "config.json").is_file():
        raise MergeError(f"{base_dir} is not a model directory (it has no config.json)")
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise MergeError(f"{adapter_dir} is not a PEFT adapter directory (it has no {ADAPTER_CONFIG})")
    config = PeftConfig.from_pretrained(adapter_dir)  # of the adapter's own type (LoraConfig, IA3Config, ...)
    if config.is_prompt_learning:
        raise MergeError(f"a {config.peft_type} adapter adds virtual tokens, not weights: it cannot be merged "
                         "into the model; load it with PeftModel.from_pretrained instead")
    whole = [name for name in ("modules_to_save", "trainable_token_indices") if getattr(config, name, None)]
    if whole:
        raise MergeError(f"the adapter in {adapter_dir} also trains whole modules or token rows ({', '.join(whole)}): "
                         "the shard-by-shard merge folds adapter layers only; merge it with peft's "
                         "merge_and_unload() on the loaded model instead")


def _base_checkpoint(base_dir: Path) -> Checkpoint:
    """The base model's safetensors (headers only; nothing is read yet), or MergeError saying what to do."""
    try:
        return Checkpoint(base_dir, digest_cache=None)
    except CheckpointError as exc:
        if (base_dir / MODEL_INDEX).is_file() or (base_dir / MODEL_WEIGHTS).is_file():
            raise MergeError(str(exc)) from exc
        raise MergeError(f"{base_dir} has no safetensors weights ({MODEL_WEIGHTS} or {MODEL_INDEX}): save the base "
                         "model with transformers' save_pretrained first") from exc


@dataclass(frozen=True)
class _Adapted:
    """One module the adapter adapts: a weightless copy of it and its tensors' names in the checkpoint."""

    module: nn.Module  # on the meta device
    checkpoint_keys: dict[str, str]  # the module's own tensor name ("weight") -> the checkpoint's name
    adapter_weights: dict[str, torch.Tensor]  # the adapter's saved weights for this module, keys as saved


@dataclass(frozen=True)
class AdaptedModules:
    """The modules of the base model an adapter adapts, and peft's merge of each from the checkpoint's tensors."""

    peft_config: PeftConfig  # as peft resolved it on the whole model (e.g. "all-linear" spelled out)
    modules: dict[str, _Adapted]  # by module path in the full model
    owners: dict[str, tuple[str, str]]  # checkpoint key -> (module path, the module's own tensor name)
    adapter_dir: Path

    @classmethod
    def find(cls, config: PretrainedConfig, base_dir: Path, adapter_dir: Path,
             checkpoint: Checkpoint) -> AdaptedModules:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        tied = _tied_weights(skeleton)
        prefix = skeleton.base_model_prefix
        try:  # peft's own loading, on no weights: the same target matching and the same errors as on the model
            adapted = PeftModel.from_pretrained(skeleton, adapter_dir, low_cpu_mem_usage=True)
        except (RuntimeError, ValueError, KeyError) as exc:  # shapes or module names of another model
            raise _does_not_fit(adapter_dir, base_dir, exc) from exc
        resolved = copy.deepcopy(adapted.peft_config["default"])
        # Each module is merged in a bare container: not a causal LM, and no model path of its own.
        resolved.task_type, resolved.base_model_name_or_path = None, None
        bases = {name.removeprefix(_ADAPTER_KEY_PREFIX): module.get_base_layer()
                 for name, module in adapted.named_modules() if isinstance(module, BaseTunerLayer)}
        adapter_weights = _adapter_weights_by_module(load_peft_weights(str(adapter_dir), device="cpu"), bases,
                                                     adapter_dir, base_dir)
        modules, owners = {}, {}
        for path, base in bases.items():
            keys = {}
            for local in base.state_dict():
                name = f"{path}.{local}"
                if name in tied:
                    raise MergeError(
                        f"the adapter in {adapter_dir} changes {path}, whose weight the base model in {base_dir} "
                        f"shares with {tied[name]} (tied word embeddings): merging it would change both; train the "
                        f"adapter without {path.rsplit('.', 1)[-1]}, or merge into a base saved with "
                        "tie_word_embeddings=False")
                keys[local] = _checkpoint_key(name, prefix, checkpoint, base_dir)
                owners[keys[local]] = (path, local)
            modules[path] = _Adapted(base, keys, adapter_weights.get(path, {}))
        return cls(resolved, modules, owners, adapter_dir)

    def merged_tensors(self, checkpoint: Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of the merged model under its checkpoint name, reading one file at a time."""
        gathering: dict[str, dict[str, torch.Tensor]] = {}  # module path -> its tensors read so far
        for file in checkpoint.files:
            with safe_open(str(file), framework="pt") as weights:
                for key in weights.keys():
                    owner = self.owners.get(key)
                    if owner is None:
                        yield key, weights.get_tensor(key)
                        continue
                    path, local = owner
                    tensors = gathering.setdefault(path, {})
                    tensors[local] = weights.get_tensor(key)
                    if len(tensors) == len(self.modules[path].checkpoint_keys):
                        yield from self._merge(path, gathering.pop(path))
        if gathering:
            raise MergeError(f"the base checkpoint lacks some weights of {', '.join(sorted(gathering))}")

    def _merge(self, path: str, tensors: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        adapted = self.modules[path]
        module = copy.deepcopy(adapted.module)
        module.load_state_dict(tensors, assign=True)  # the checkpoint's tensors, in their dtype
        wrapped = get_peft_model(_container(path, module), copy.deepcopy(self.peft_config))
        try:
            loaded = set_peft_model_state_dict(wrapped, adapted.adapter_weights)
        except RuntimeError as exc:
            raise MergeError(f"the adapter in {self.adapter_dir} does not fit the base model: {exc}") from exc
        if loaded.unexpected_keys:
            raise MergeError(f"the adapter in {self.adapter_dir} does not fit the base model: unexpected weights "
                             f"{', '.join(loaded.unexpected_keys[:3])}")
        merged = wrapped.merge_and_unload().get_submodule(path)
        for local, tensor in merged.state_dict().items():
            yield adapted.checkpoint_keys[local], tensor.detach().contiguous()


def _does_not_fit(adapter_dir: Path, base_dir: Path, exc: object) -> MergeError:
    return MergeError(f"the adapter in {adapter_dir} does not fit the base model in {base_dir}: {exc}")


def _tied_weights(model: nn.Module) -> dict[str, str]:
    """Each parameter name that shares its tensor with another -> that other name."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {name: next(other for other in group if other != name)
            for group in names.values() if len(group) > 1 for name in group}


def _checkpoint_key(name: str, prefix: str, checkpoint: Checkpoint, base_dir: Path) -> str:
    """The checkpoint's name for the model's tensor ``name``: the same, or without the base model's prefix
    (GPT-2 checkpoints from the Hub store ``h.0.attn.c_attn.weight`` for ``transformer.h.0.attn.c_attn.weight``)."""
    if name in checkpoint:
        return name
    short = name.removeprefix(f"{prefix}.") if prefix else name
    if short != name and short in checkpoint:
        return short
    raise MergeError(f"the base checkpoint in {base_dir} has no tensor {name!r}, which the adapter adapts")


def _adapter_weights_by_module(weights: dict[str, torch.Tensor], modules: dict[str, nn.Module], adapter_dir: Path,
                               base_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The adapter's saved weights grouped by the adapted module they belong to; a weight of no such module
    means the adapter was made for another model."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        path = key.removeprefix(_ADAPTER_KEY_PREFIX)
        while path and path not in modules:
            path = path.rpartition(".")[0]
        if not path:
            raise _does_not_fit(adapter_dir, base_dir, f"it has weights for {key!r}, a module peft does not adapt")
        grouped.setdefault(path, {})[key] = tensor
    return grouped


def _container(path: str, module: nn.Module) -> nn.Module:
    """An otherwise empty module that holds ``module`` at ``path``, so peft sees the full model's module names."""
    root = parent = nn.Module()
    *parents, leaf = path.split(".")
    for name in parents:
        child = nn.Module()
        parent.add_module(name, child)
        parent = child
    parent.add_module(leaf, module)
    return root


def shard_size_bytes(size: int | str) -> int:
    """``size`` in bytes: an integer, or digits and a unit as transformers takes them ("5GB", "200KB")."""
    if isinstance(size, str):
        text = size.strip()
        unit = text[-2:].upper()
        try:
            size = int(float(text[:-2]) * _SIZE_UNITS[unit])
        except (KeyError, ValueError):
            raise ValueError(f"max_shard_size {text!r} is not a size like '5GB' or '200KB' "
                             f"(units {', '.join(_SIZE_UNITS)})") from None
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"max_shard_size must be a positive number of bytes, got {size!r}")
    return size


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_shard_size`` bytes, holding one shard at a time.

    Shards are written under temporary names, renamed when their count is known: one
    ``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` and the index transformers writes.
    """

    def __init__(self, directory: Path, max_shard_size: int | str) -> None:
        self.directory = directory
        self.limit = shard_size_bytes(max_shard_size)
        self.shard: dict[str, torch.Tensor] = {}
        self.shard_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total_size = 0
        self.total_parameters = 0
        self.float_dtype: torch.dtype | None = None  # of the first floating-point tensor

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.shard and self.shard_bytes + size > self.limit:
            self._write()
        self.shard[name] = tensor
        self.shard_bytes += size
        self.total_size += size
        self.total_parameters += tensor.numel()
        if self.float_dtype is None and tensor.is_floating_point():
            self.float_dtype = tensor.dtype

    def _write(self) -> None:
        path = self.directory / f".shard-{len(self.written) + 1:05d}.safetensors"
        save_file(self.shard, str(path), metadata={"format": "pt"})
        self.written.append((path, list(self.shard)))
        self.shard, self.shard_bytes = {}, 0

    def finish(self) -> None:
        if self.shard:
            self._write()
        if len(self.written) == 1:
            self.written[0][0].rename(self.directory / MODEL_WEIGHTS)
            return
        weight_map = {}
        for number, (path, names) in enumerate(self.written, start=1):
            name = SHARD_NAME.format(index=number, count=len(self.written))
            path.rename(self.directory / name)
            weight_map.update(dict.fromkeys(names, name))
        index = {"metadata": {"total_parameters": self.total_parameters, "total_size": self.total_size},
                 "weight_map": weight_map}
        (self.directory / MODEL_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
