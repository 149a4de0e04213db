"""The frozen trunk blocks, loaded once and shared by every session.

The host holds the widest range of blocks its operator allows; each session runs its own
contiguous sub-range (its client's cut). Each training session adds one named ``peft``
adapter on the blocks of its range (or none, for a frozen trunk); the base weights
exist once in memory, on the configured device and in the configured compute dtype, while
every adapter stays fp32 (peft casts adapter weights up). Model compute is serialised by
one lock: switching the active adapter and running a block must not interleave between
sessions.

One peft model holds adapters of one method only, so each method (LoRA, LoHa, LoKr, IA3)
gets its own peft model, built on a copy of the trunk's module tree that shares every
weight with it: sessions of different methods run side by side over one set of weights,
and the trunk itself stays without adapter layers (a frozen session runs it directly).
"""

from __future__ import annotations

import contextlib
import gc
import os
import time

import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers.cache_utils import Cache

from splitcore import LoraSettings, init_lora_weights, split_model
from splitcore.model.fingerprint import combine_digests
from splitcore.model.lora import lora_config_for
from splitcore.model.part_loading import CheckpointModel, PartSelection, weight_sharing_copy
from splitcore.model.seeding import seeded_dropout
from splitcore.model.split_spec import CutBounds, SplitSpec
from splitcore.remote.errors import LayersRefused, OutOfMemory

from .config import TrunkServerConfig
from .stats import TrunkStats
from .turns import FairLock, check_deadline


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class TrunkHost:
    def __init__(self, config: TrunkServerConfig, model_id: str | None = None) -> None:
        # Only the trunk's blocks are read, each cast to the compute dtype and placed on the device as it
        # is read: the host never holds the whole model, nor its blocks in the checkpoint's dtype.
        source = CheckpointModel(config.model_dir, dtype=config.torch_dtype, device=config.device)
        self.config = source.config
        self.family = source.family
        self.num_layers = source.num_layers
        default, widest = self._cuts(config)
        model = source.build(PartSelection.of(widest.trunk_layers))
        _, trunk, _ = split_model(model, widest.n_bottom, widest.n_top)
        del model  # the Bottom's and Top's modules were never loaded
        self.model_id = model_id or source.model_dir.name
        self.bounds = CutBounds(num_layers=self.num_layers, default=default.trunk_layers,
                                lowest=trunk.layer_indices[0], highest=trunk.layer_indices[-1] + 1)
        self.hidden_size = int(self.config.hidden_size)
        self.max_positions = int(getattr(self.config, "max_position_embeddings", 0) or 0)
        # Digests of the weights as stored, hashed from the checkpoint: the fingerprint a client computes,
        # whatever dtype this server computes in.
        self._digests = source.state_digests(trunk)
        self._fingerprints: dict[range, str] = {}
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.trunk = trunk.eval()
        self.base_bytes = tensor_bytes(self.trunk.state_dict().values())
        # Sessions take the model in turn (first come, first served), whoever asks most often.
        self.lock = FairLock()
        self._pefts: dict[str, PeftModel] = {}  # by adapter method
        self._method_of: dict[str, str] = {}  # adapter name -> method
        self._weight_storages: frozenset[int] | None = None  # see weight_storages()
        # By adapter method (None: the bare trunk), the adapter last made active and the last train() mode:
        # peft's set_adapter and Module.train walk every module, so each runs only when it changes something.
        self._active: dict[str, str] = {}
        self._training: dict[str | None, bool] = {}
        # The server's counters: the host measures busy time, sessions and the servicer feed the rest.
        self.stats = TrunkStats()

    # -------------------------------------------------------------- layer ranges

    def _cuts(self, config: TrunkServerConfig) -> tuple[SplitSpec, SplitSpec]:
        """The default cut and the widest one sessions may ask for (ValueError naming the model's blocks)."""
        if config.layers is None:
            return (SplitSpec(self.num_layers, config.n_bottom, config.n_top),
                    SplitSpec(self.num_layers, config.min_bottom, config.min_top))
        first, last = config.layers
        if last > self.num_layers - 2:
            raise ValueError(f"--layers {first}-{last}: the model has {self.num_layers} blocks (0-"
                             f"{self.num_layers - 1}) and at least the last one stays with the client, so a trunk "
                             f"serves blocks up to {self.num_layers - 2}")
        served = SplitSpec(self.num_layers, first, self.num_layers - 1 - last)
        return served, served

    def layers_for(self, start: int, end: int) -> range:
        """The range a session asked for (0, 0: the default), or LayersRefused."""
        if start == 0 and end == 0:
            return self.bounds.default
        if not self.bounds.allows(range(start, end)):
            lowest, highest = self.bounds.lowest, self.bounds.highest
            raise LayersRefused(
                f"layers {start}-{end - 1} are outside what this trunk serves: a session may run any range "
                f"within layers {lowest}-{highest - 1} of {self.num_layers} (at least "
                f"{lowest} blocks stay with the client before the trunk and "
                f"{self.num_layers - highest} after it)")
        return range(start, end)

    def fingerprint_of(self, layers: range) -> str:
        """The ``weights_fingerprint`` a client computes on its trunk part for ``layers`` (in the dtype
        the weights were loaded in, whatever this server computes in)."""
        if layers not in self._fingerprints:
            marker = f".{self.family.layers_attr}."
            owned = {f"{marker}{i}." for i in layers}
            self._fingerprints[layers] = combine_digests({
                key: digest for key, digest in self._digests.items()
                if marker not in key or any(layer in key for layer in owned)})
        return self._fingerprints[layers]

    # -------------------------------------------------------------- adapters

    def add_adapter(self, name: str, settings: LoraSettings, seed: int,
                    layers: range) -> dict[str, torch.nn.Parameter]:
        """Add an adapter on the blocks ``layers`` for one session; returns its parameters by full-model name."""
        peft_config = lora_config_for(self.trunk, self.family, settings, layers, where="the trunk")
        with self.lock:
            # autocast_adapter_dtype: the adapter's weights are fp32 even on bf16/fp16 blocks.
            peft = self._pefts.get(settings.method)
            if peft is None:
                peft = get_peft_model(weight_sharing_copy(self.trunk), peft_config, adapter_name=name,
                                      autocast_adapter_dtype=True)
                self._pefts[settings.method] = peft
            else:
                peft.add_adapter(name, peft_config, autocast_adapter_dtype=True)
            self._forget_modes(settings.method)  # the new adapter's modules start in their own modes
            self._method_of[name] = settings.method
            self._weight_storages = None
            init_lora_weights(peft, seed, adapter_name=name)
            # LoRA's weights are named ...q_proj.lora_A.<name>.weight, LoHa's ...q_proj.hada_w1_a.<name>.
            return {
                ".".join(part for part in key.removeprefix("base_model.model.").split(".") if part != name): param
                for key, param in peft.named_parameters()
                if name in key.split(".")
            }

    def weight_storages(self) -> frozenset[int]:
        """The addresses of the storages of every weight and buffer the blocks and adapters hold: what
        autograd saves of them belongs to the model, not to the session whose Forward saved it."""
        storages = self._weight_storages  # read without queueing for the model: a Forward queues once, to compute
        if storages is None:
            with self.lock:
                modules = [self.trunk, *self._pefts.values()]
                storages = self._weight_storages = frozenset(
                    tensor.untyped_storage().data_ptr()
                    for module in modules for tensor in (*module.parameters(), *module.buffers()))
        return storages

    def _peft_of(self, name: str) -> PeftModel:
        return self._pefts[self._method_of[name]]

    def remove_adapter(self, name: str) -> None:
        with self.lock:
            self._weight_storages = None
            method = self._method_of.pop(name, None)
            self._forget_modes(method)
            peft = self._pefts.get(method)
            if peft is None or name not in peft.peft_config:
                return
            if len(peft.peft_config) == 1:
                del self._pefts[method]  # its last adapter: drop the copy (peft keeps one adapter at least)
            else:
                peft.delete_adapter(name)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        with self.lock:
            state = get_peft_model_state_dict(self._peft_of(name), adapter_name=name)
            return {key: value.detach().to("cpu", copy=True) for key, value in state.items()}

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        expected = self.adapter_state(name)
        missing = expected.keys() - state.keys()
        unexpected = state.keys() - expected.keys()
        if missing or unexpected:
            first = sorted(missing or unexpected)[0]
            raise ValueError(f"adapter state does not match this session's adapter: "
                             f"{'missing' if missing else 'unexpected'} weight {first!r}")
        for key, value in state.items():
            if value.shape != expected[key].shape:
                raise ValueError(f"adapter weight {key!r} has shape {list(value.shape)}, "
                                 f"the session's has {list(expected[key].shape)}")
        with self.lock:
            set_peft_model_state_dict(self._peft_of(name), state, adapter_name=name)

    # -------------------------------------------------------------- compute

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor off the wire, on the compute device: floats in the compute dtype, masks as they are."""
        if tensor.is_floating_point():
            return tensor.to(device=self.device, dtype=self.dtype)
        return tensor.to(device=self.device)

    @contextlib.contextmanager
    def computing(self):
        """Hold the model for one computation, in turn with the other calls (first come, first served); a
        call whose caller's deadline passed while it waited is dropped here (DeadlinePassed), before it
        changes anything. The time the model is held (not the wait for it) counts as busy. On a GPU the
        clock stops when the device has finished, not when the kernels are queued."""
        with self.lock:
            check_deadline("the call")  # its caller gave up while it waited: its retry is queued behind
            started = time.perf_counter()
            try:
                yield
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
            finally:
                self.stats.add_busy(time.perf_counter() - started)

    def _forget_modes(self, method: str | None) -> None:
        self._active.pop(method, None)
        self._training.pop(method, None)

    def _activated(self, name: str | None) -> torch.nn.Module:
        """The module that runs with the session's adapter active, or with no adapter (the trunk itself has
        no adapter layers)."""
        if name is None:
            return self.trunk
        method = self._method_of[name]
        peft = self._pefts[method]
        if self._active.get(method) != name:
            peft.set_adapter(name)
            self._active[method] = name
        return peft

    def _set_training(self, name: str | None, module: torch.nn.Module, training: bool) -> None:
        method = None if name is None else self._method_of[name]
        if self._training.get(method) != training:
            module.train(training)
            self._training[method] = training

    def forward(self, adapter: str | None, layers: range, hidden: torch.Tensor, attention_mask: torch.Tensor,
                past_key_values: Cache | None = None, training: bool = False, seed: int = 0) -> torch.Tensor:
        """Run the blocks ``layers`` on tensors already on the device; the caller decides whether autograd
        records (torch.no_grad or not).

        ``training`` switches dropout (the base model's and LoRA's) on, as in the client's parts,
        with masks drawn from ``seed`` on the CPU and CUDA generators alike.
        """
        with self.computing(), seeded_dropout(seed, self.device):
            module = self._activated(adapter)
            self._set_training(adapter, module, training)
            use_cache = past_key_values is not None
            return module(hidden, attention_mask, past_key_values=past_key_values, use_cache=use_cache,
                          layers=layers)

    def backward(self, adapter: str | None, output: torch.Tensor, grad_output: torch.Tensor) -> None:
        # set_adapter() turns requires_grad off for every other adapter, and autograd drops
        # gradients of leaves that no longer require grad: re-activate this session's adapter.
        with self.computing():
            self._activated(adapter)
            output.backward(grad_output)

    @contextlib.contextmanager
    def memory_guard(self, session_id: str, what: str, shape):
        """Turn the device running out of memory into OutOfMemory (RESOURCE_EXHAUSTED) naming the session
        and the request size, after freeing what the failed call took."""
        message = None
        try:
            yield
        except torch.OutOfMemoryError as exc:
            rows, positions = (list(shape) + [1, 1])[:2]
            message = (f"session {session_id[:8]}: {what} of {rows} rows x {positions} positions did not fit in "
                       f"the memory of {self.device} ({str(exc).splitlines()[0][:300]}); send fewer rows or "
                       "positions per call, or try again when other sessions close")
        if message is None:
            return
        # Out of the except block, the failed call's frames (and their tensors) are gone: free the cache.
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        raise OutOfMemory(message)

    # -------------------------------------------------------------- memory

    def memory_total(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.get_device_properties(self.device).total_memory)
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return 0

    def memory_beyond_base(self, counted: int) -> int:
        """What the sessions take: on a GPU the allocator's figure beyond the base weights (it sees
        autograd graphs and workspaces too), on the CPU ``counted`` (their tensors, summed)."""
        if self.device.type == "cuda":
            return max(0, int(torch.cuda.memory_allocated(self.device)) - self.base_bytes)
        return counted
