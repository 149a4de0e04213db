"""Build the parts of a model from its checkpoint, loading only the blocks a process runs.

The model's module tree is built on the meta device (``accelerate.init_empty_weights``:
parameters take no memory, weightless buffers such as rotary frequencies are computed as
usual), then only the parameters of the wanted pieces are read from the checkpoint's
safetensors, cast to the compute dtype and placed on the compute device as they are read.
Everything else stays on the meta device and is never read: a client reads the embeddings,
its first and last blocks, the final norm and the LM head; a trunk reads its range of blocks.

Frozen tensors can be shared: a ``FrozenWeightStore`` keeps the tensors it loaded (per model,
dtype and device) and hands the same ``nn.Parameter`` to every module tree built from it, so
two jobs, a generation and an audit on one model hold one copy of each block they share.
Each request builds a fresh module tree (cheap, on meta) whose parameters are the shared
tensors, and peft adds its adapter layers to that tree only. The store keeps what it loaded
within a byte budget, evicting the least recently used tensors; a tensor evicted while a job
still runs on it stays alive with that job and is found again (no second copy) while it does.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedModel

from splitcore.model.architectures import ArchitectureFamily, family_for
from splitcore.model.checkpoint import Checkpoint
from splitcore.model.default_model import data_dir
from splitcore.model.fingerprint import combine_digests, tensor_digests, weights_fingerprint
from splitcore.model.parts import Bottom, Top, split_model
from splitcore.model.split_spec import SplitSpec

log = logging.getLogger(__name__)

GIB = 1 << 30
DEFAULT_DIGEST_CACHE = "data-dir"  # CheckpointModel's default: tensor-digests in the data directory


@dataclass(frozen=True)
class PartSelection:
    """Which pieces of a model a process holds: decoder blocks by global index, the embeddings,
    and the head (final norm and LM head)."""

    layers: frozenset[int]
    embeddings: bool = False
    head: bool = False

    @classmethod
    def of(cls, layers: Iterable[int], embeddings: bool = False, head: bool = False) -> PartSelection:
        return cls(frozenset(layers), embeddings, head)

    def describe(self) -> str:
        pieces = [f"blocks {format_layers(self.layers)}"] if self.layers else []
        pieces += [name for name, on in (("embeddings", self.embeddings), ("norm and LM head", self.head)) if on]
        return ", ".join(pieces) or "nothing"


def format_layers(layers: Iterable[int]) -> str:
    """E.g. "0-1, 28-29" for {0, 1, 28, 29}."""
    ordered = sorted(layers)
    runs: list[list[int]] = []
    for index in ordered:
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


# accelerate's init_empty_weights patches nn.Module for the whole process while a tree is built.
_EMPTY_MODEL_LOCK = threading.Lock()


def empty_model(config: PretrainedConfig) -> PreTrainedModel:
    """The model's module tree with every parameter on the meta device (no memory, no reads)."""
    with _EMPTY_MODEL_LOCK, init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    return model


class ModelLayout:
    """How a model's parameter names map to pieces and to checkpoint keys."""

    def __init__(self, model: PreTrainedModel, family: ArchitectureFamily, checkpoint: Checkpoint) -> None:
        self.family = family
        self.checkpoint = checkpoint
        backbone = family.backbone_attr
        self._layers_prefix = f"{backbone}.{family.layers_attr}."
        self._embedding_prefixes = tuple(f"{backbone}.{name}." for name in family.embedding_attrs)
        self._head_prefixes = (f"{backbone}.{family.final_norm_attr}.", "lm_head.")
        self._base_prefix = f"{getattr(model, 'base_model_prefix', '') or backbone}."
        embedding = model.get_input_embeddings().weight
        self._embedding_name = next(name for name, param in model.named_parameters() if param is embedding)
        self._tied = bool(getattr(model.config, "tie_word_embeddings", False))

    def wanted(self, name: str, selection: PartSelection) -> bool:
        if name.startswith(self._layers_prefix):
            return int(name[len(self._layers_prefix):].split(".", 1)[0]) in selection.layers
        if name.startswith(self._embedding_prefixes):
            return selection.embeddings
        if name.startswith(self._head_prefixes):
            return selection.head
        raise ValueError(f"parameter {name!r} belongs to no block, embedding or head of the "
                         f"{self.family.name} layout; this model cannot be loaded in parts")

    def key_of(self, name: str) -> str:
        """The checkpoint key holding parameter ``name``: the same name, the name without the base
        model's prefix (older GPT-2 checkpoints), or the input embeddings for a tied LM head."""
        if name in self.checkpoint:
            return name
        bare = name.removeprefix(self._base_prefix)
        if bare != name and bare in self.checkpoint:
            return bare
        if self._tied and name.startswith("lm_head."):
            return self.key_of(self._embedding_name)
        raise ValueError(f"the checkpoint in {self.checkpoint.model_dir} has no tensor for parameter {name!r}")


def weight_sharing_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s tree whose parameters and buffers are ``module``'s own tensors: peft can add
    adapter layers to the copy while the original stays without them, and no weight is copied."""
    shared = {id(tensor): tensor for tensor in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo=shared)


def read_frozen(checkpoint: Checkpoint, key: str, dtype: torch.dtype | None, device: torch.device) -> nn.Parameter:
    """One tensor of the checkpoint as a frozen parameter, in ``dtype`` on ``device``."""
    return nn.Parameter(checkpoint.read(key, dtype, device), requires_grad=False)


def _set_parameter(model: nn.Module, name: str, param: nn.Parameter) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    module._parameters[attr] = param


class FrozenWeightStore:
    """Frozen tensors loaded from checkpoints, shared by every module tree built from them.

    Keyed by (checkpoint directory, dtype, device, checkpoint key). ``budget_bytes`` bounds
    what the store keeps once no request needs it (least recently used out); None keeps all.
    """

    def __init__(self, budget_bytes: int | None = None) -> None:
        self.budget_bytes = budget_bytes
        self._kept: OrderedDict[tuple, nn.Parameter] = OrderedDict()
        self._alive: weakref.WeakValueDictionary[tuple, nn.Parameter] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    @property
    def kept_bytes(self) -> int:
        return sum(_nbytes(p) for p in self._kept.values())

    def parameters(self, checkpoint: Checkpoint, keys: Iterable[str], dtype: torch.dtype,
                   device: torch.device) -> tuple[dict[str, nn.Parameter], int]:
        """The frozen parameters of ``keys``, loading those not held; returns them and the bytes loaded now."""
        root = (str(checkpoint.model_dir.resolve()), str(dtype), str(device))
        found: dict[str, nn.Parameter] = {}
        loaded = 0
        with self._lock:
            for key in dict.fromkeys(keys):
                slot = (*root, key)
                param = self._kept.get(slot)
                if param is None:
                    param = self._alive.get(slot)  # evicted, but a module tree still uses it
                if param is None:
                    param = read_frozen(checkpoint, key, dtype, device)
                    self._alive[slot] = param
                    loaded += _nbytes(param)
                self._kept[slot] = param
                self._kept.move_to_end(slot)
                found[key] = param
            self._evict(keep={(*root, key) for key in found})
        return found, loaded

    def _evict(self, keep: set[tuple]) -> None:
        if self.budget_bytes is None:
            return
        total = self.kept_bytes
        for slot in list(self._kept):
            if total <= self.budget_bytes:
                break
            if slot in keep:
                continue
            total -= _nbytes(self._kept.pop(slot))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class ModelParts:
    """Where a client gets its parts of one model: ``config``, ``family``, the client's Bottom and
    Top for a cut, the fingerprint of the trunk's blocks, and the trunk's forward for the audit."""

    config: PretrainedConfig
    family: ArchitectureFamily

    def client_parts(self, spec: SplitSpec) -> tuple[Bottom, Top]:
        raise NotImplementedError

    def trunk_fingerprint(self, layers: range) -> str:
        raise NotImplementedError

    def run_trunk(self, layers: range, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The trunk's output for ``hidden`` (batch, seq, hidden), without gradient, as the trunk would compute it."""
        raise NotImplementedError

    def full_model(self) -> PreTrainedModel:
        """The whole model, for the runs that need it (``--local``)."""
        raise NotImplementedError

    @property
    def generation_config(self) -> GenerationConfig:
        raise NotImplementedError


class LoadedModelParts(ModelParts):
    """Parts of a model already in memory (tests and small models); they share its modules."""

    def __init__(self, model: PreTrainedModel) -> None:
        if getattr(model, "config", None) is None:
            raise ValueError(f"expected a Hugging Face *ForCausalLM model, got {type(model).__name__}")
        self.model = model
        self.config = model.config
        self.family = family_for(model.config)

    def _split(self, layers: range):
        return split_model(self.model, layers.start, self.family.num_layers(self.config) - layers.stop)

    def client_parts(self, spec):
        bottom, _, top = split_model(self.model, spec.n_bottom, spec.n_top)
        return bottom, top

    def trunk_fingerprint(self, layers):
        return weights_fingerprint(self._split(layers)[1])

    @torch.no_grad()
    def run_trunk(self, layers, hidden, attention_mask):
        trunk = self._split(layers)[1]
        was_training = trunk.training
        try:
            return trunk.eval()(hidden, attention_mask)
        finally:
            trunk.train(was_training)

    def full_model(self):
        return self.model

    @property
    def generation_config(self):
        return self.model.generation_config


def model_parts(model: PreTrainedModel | ModelParts) -> ModelParts:
    return model if isinstance(model, ModelParts) else LoadedModelParts(model)


class CheckpointModel(ModelParts):
    """One model directory: its config, layout and checkpoint, and module trees holding chosen pieces.

    ``dtype`` is the compute dtype of the frozen floating weights (None: as stored); ``device``
    where they live. ``store`` shares loaded tensors between calls (and with other users of
    the store); without one, every call loads what it needs afresh. ``digest_cache``: where the
    digests of the checkpoint's tensors are kept between processes (default: ``tensor-digests``
    in the data directory; None: hashed afresh by each process).
    """

    def __init__(self, model_dir: str | os.PathLike, dtype: torch.dtype | None = torch.float32,
                 device: str | torch.device = "cpu", store: FrozenWeightStore | None = None,
                 digest_cache: str | os.PathLike | None = DEFAULT_DIGEST_CACHE) -> None:
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"model directory {self.model_dir} has no config.json")
        self.config = AutoConfig.from_pretrained(self.model_dir)
        self.family = family_for(self.config)
        self.num_layers = self.family.num_layers(self.config)
        if digest_cache == DEFAULT_DIGEST_CACHE:
            digest_cache = data_dir() / "tensor-digests"
        self.checkpoint = Checkpoint(self.model_dir, digest_cache=digest_cache)
        self.dtype = dtype
        self.device = torch.device(device)
        self.store = store
        self._layout: ModelLayout | None = None

    def layout(self, model: PreTrainedModel) -> ModelLayout:
        if self._layout is None:
            self._layout = ModelLayout(model, self.family, self.checkpoint)
        return self._layout

    def build(self, selection: PartSelection) -> PreTrainedModel:
        """The whole module tree, with the selected pieces' weights loaded and every other parameter on meta.

        Buffers (rotary frequencies, embedding scales) are computed, not read, and go to the device.
        """
        started = time.perf_counter()
        model = empty_model(self.config)
        slots = self._slots(model, selection)
        if self.store is not None:
            params, loaded = self.store.parameters(self.checkpoint, slots.values(), self.dtype, self.device)
        else:
            params = {key: self._read_frozen(key) for key in dict.fromkeys(slots.values())}
            loaded = sum(_nbytes(p) for p in params.values())
        for name, key in slots.items():
            _set_parameter(model, name, params[key])
        self._place_buffers(model)
        held = sum(_nbytes(p) for p in params.values())
        log.info("%s: %s in %s on %s: %.2f GiB of weights (%.2f GiB read from the checkpoint now, the rest "
                 "shared) in %.1f s%s; this process's resident memory: %s",
                 self.model_dir.name, selection.describe(), _dtype_name(self.dtype), self.device, held / GIB,
                 loaded / GIB, time.perf_counter() - started,
                 f"; the store keeps {self.store.kept_bytes / GIB:.2f} GiB" if self.store is not None else "",
                 resident_memory_text())
        model.requires_grad_(False)
        return model

    def _read_frozen(self, key: str) -> nn.Parameter:
        return read_frozen(self.checkpoint, key, self.dtype, self.device)

    def _place_buffers(self, model: nn.Module) -> None:
        for module in model.modules():
            for attr, buffer in module._buffers.items():
                if buffer is not None and buffer.device != self.device:
                    module._buffers[attr] = buffer.to(self.device)

    def _slots(self, model: PreTrainedModel, selection: PartSelection) -> dict[str, str]:
        """Every parameter name of ``model`` in ``selection`` (tied ones too) -> the checkpoint key holding it."""
        layout = self.layout(model)
        return {name: layout.key_of(name) for name, _ in model.named_parameters(remove_duplicate=False)
                if layout.wanted(name, selection)}

    def parameter_keys(self, selection: PartSelection) -> set[str]:
        """The checkpoint keys ``build(selection)`` reads."""
        return set(self._slots(empty_model(self.config), selection).values())

    def state_digests(self, part: nn.Module) -> dict[str, bytes]:
        """The ``tensor_digests`` of a part's state dict, its weights hashed from the checkpoint's bytes
        (weights on meta are never loaded; buffers saved with the model are hashed as they are)."""
        model_digests = {}
        layout = self._layout
        if layout is None:
            raise RuntimeError("build a module tree before asking for digests")
        for name, tensor in part.state_dict().items():
            if tensor.device.type != "meta" and name not in self.checkpoint:
                model_digests.update(tensor_digests({name: tensor}))
                continue
            model_digests[name] = self.checkpoint.digest(layout.key_of(name), as_name=name)
        self.checkpoint.save_digests()
        return model_digests

    def fingerprint(self, part: nn.Module) -> str:
        """``weights_fingerprint(part)`` of the part as stored, without loading its weights."""
        return combine_digests(self.state_digests(part))

    # ------------------------------------------------------------ ModelParts

    def client_parts(self, spec: SplitSpec) -> tuple[Bottom, Top]:
        """Bottom and Top of ``spec``: the embeddings, its first and last blocks, the norm and the head."""
        model = self.build(PartSelection.of([*spec.bottom_layers, *spec.top_layers], embeddings=True, head=True))
        bottom, _, top = split_model(model, spec.n_bottom, spec.n_top)
        return bottom, top

    def _empty_trunk(self, layers: range):
        model = empty_model(self.config)
        self.layout(model)
        return model, split_model(model, layers.start, self.num_layers - layers.stop)[1]

    def trunk_fingerprint(self, layers: range) -> str:
        return self.fingerprint(self._empty_trunk(layers)[1])

    @torch.no_grad()
    def run_trunk(self, layers: range, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Block by block: each block is read, run and freed, so this holds one trunk block at a time."""
        model, trunk = self._empty_trunk(layers)
        self._place_buffers(model)
        layout = self.layout(model)
        for index in layers:
            block = trunk.blocks[str(index)]
            prefix = f"{self.family.backbone_attr}.{self.family.layers_attr}.{index}."
            for name, _ in block.named_parameters(prefix=prefix.rstrip("."), remove_duplicate=False):
                _set_parameter(model, name, self._read_frozen(layout.key_of(name)))
            hidden = trunk(hidden, attention_mask, layers=range(index, index + 1))  # (batch, seq, hidden)
            block.to("meta")
        return hidden

    def full_model(self) -> PreTrainedModel:
        return self.build(PartSelection.of(range(self.num_layers), embeddings=True, head=True))

    @property
    def generation_config(self) -> GenerationConfig:
        try:
            return GenerationConfig.from_pretrained(self.model_dir)
        except OSError:
            return GenerationConfig.from_model_config(self.config)


def resident_memory_text() -> str:
    """This process's resident set size now and at its peak, from /proc (Linux), e.g. "1.20 GiB (peak 1.31 GiB)"."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        now, peak = (int(fields[name].split()[0]) * 1024 for name in ("VmRSS", "VmHWM"))
    except (OSError, KeyError, ValueError):
        return "unknown"
    return f"{now / GIB:.2f} GiB (peak {peak / GIB:.2f} GiB)"


def _dtype_name(dtype: torch.dtype | None) -> str:
    return "the stored dtype" if dtype is None else str(dtype).removeprefix("torch.")
