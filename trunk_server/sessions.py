"""Sessions: one client's trunk adapter, optimizer, saved activations, replies and KV cache.

``Session`` holds what one client may use of the trunk and the operations on it; every
request is checked against the session's budgets before it allocates anything.
``SessionRegistry`` opens, finds, closes and expires sessions.

Steps are idempotent. Replies to Forward and Backward are kept per (step, micro_batch)
until the step is applied (a Forward's reply until its Backward is answered), so a
retried call returns the same answer and never accumulates gradients twice; a retried
Step for an applied step changes nothing. A session lives on a lease that each of its
calls renews; a retried OpenSession with the same open key returns the same session.

What a session holds is bounded: Forward and Backward run only for the step after the last
applied one, and the session's memory (adapter, gradients, optimizer state, the tensors its
saved graphs keep for Backward, the replies kept for retries, the KV cache) stays within
its budget: a call that would take it beyond is refused before it keeps anything.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from splitcore.model.lora import LoraSettings
from splitcore.model.seeding import TRUNK, dropout_seed
from splitcore.process_memory import release_free_memory
from splitcore.remote import state as trunk_state
from splitcore.remote.errors import (
    ActivationsGone, BudgetExceeded, DeadlinePassed, SessionGone, StepConflict, TrunkFull,
)
from splitcore.remote.messages import OptimizerSettings
from splitcore.remote.wire import encoded_bytes
from splitcore.training.optim_state import adamw_state_tensors, grad_sq_norm, load_adamw_state, new_adamw, scale_grads

from .config import SessionBudgets
from .host import TrunkHost, tensor_bytes

log = logging.getLogger("trunk_server")
MAX_OPEN_KEY = 128


def _counted(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _mib(count: int) -> str:
    return f"{count / (1 << 20):.1f} MiB"


@dataclass
class Saved:
    input: torch.Tensor  # (batch, seq, hidden) on the device, requires grad
    output: torch.Tensor  # (batch, seq, hidden), part of the autograd graph
    nbytes: int = 0  # what the graph keeps: input, output and the activations saved for Backward


@dataclass(frozen=True)
class Kept:
    """A reply kept for retries, and the bytes its tensor takes."""

    reply: object
    nbytes: int


@contextlib.contextmanager
def saved_storages(excluded: frozenset[int]):
    """Record the storages autograd saves for Backward inside the block, each once, leaving out
    ``excluded`` (the model's weights); yields the dict (address -> bytes) it fills."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        if address not in excluded:
            seen.setdefault(address, storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield seen


@dataclass
class Session:
    id: str
    host: TrunkHost
    budgets: SessionBudgets
    inference: bool
    layers: range  # the decoder blocks this session runs
    adapter: str | None
    params: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer | None
    wire_encoding: str
    label: str
    last_used: float
    dropout_seed: int = 0
    open_key: str = ""
    calls: int = 0  # calls in progress: a session is never expired under one
    counted_bytes: int = 0
    graph_bytes_per_value: float = 0.0  # what the last Forward's graph kept, per value of its input
    applied_step: int = 0
    grad_sq: float | None = None  # the gradients' squared norm as the last Backward left them (None: unknown)
    lock: threading.Lock = field(default_factory=threading.Lock)
    saved: OrderedDict = field(default_factory=OrderedDict)
    forward_replies: dict = field(default_factory=dict)
    backward_replies: dict = field(default_factory=dict)
    cache: DynamicCache | None = None
    inference_steps: int = 0
    last_inference_reply: tuple[int, object] | None = None
    inference_batch: int | None = None  # rows in the KV cache, fixed by the first inference call
    # For the server's counters and the summary logged when the session ends.
    opened_at: float = field(default_factory=time.monotonic)
    tokens: int = 0  # rows x positions this session's calls ran forward (retries answered from a kept reply: not)
    steps_applied: int = 0

    @property
    def mode(self) -> str:
        return "inference" if self.inference else "training"

    def summary(self) -> str:
        """One line for the log: what the session did, in counts (never its data)."""
        work = (_counted(self.inference_steps, "inference call") if self.inference
                else _counted(self.steps_applied, "step") + " applied")
        return (f"{self.mode}, {work}, {_counted(self.tokens, 'token')}, "
                f"lived {time.monotonic() - self.opened_at:.1f} s")

    def _count_tokens(self, kind: str, hidden: torch.Tensor) -> None:
        rows, positions = hidden.shape[:2]
        self.tokens += rows * positions
        self.host.stats.add_tokens(kind, rows * positions)

    # -------------------------------------------------------------- budgets

    def check_request(self, hidden: torch.Tensor, positions: int | None = None, micro: int | None = None) -> None:
        """BudgetExceeded unless one call's ``hidden`` (rows x new positions, ``positions`` long with
        the KV cache) and micro-batch index fit this session's budgets and the model's positions."""
        rows, new = hidden.shape[:2]
        positions = new if positions is None else positions
        budgets = self.budgets
        if micro is not None and micro >= budgets.max_micro_batches:
            raise BudgetExceeded(f"micro-batch {micro} is beyond this trunk's budget of {budgets.max_micro_batches} "
                                 f"micro-batches per step (indices 0-{budgets.max_micro_batches - 1}); "
                                 "use fewer, larger micro-batches")
        if rows * new > budgets.max_tokens_per_request:
            raise BudgetExceeded(f"{rows} rows x {new} positions = {rows * new} tokens in one call is beyond this "
                                 f"trunk's budget of {budgets.max_tokens_per_request} tokens per request; "
                                 "send smaller micro-batches or shorter sequences")
        if self.host.max_positions and positions > self.host.max_positions:
            raise BudgetExceeded(f"a sequence of {positions} positions is longer than the model's "
                                 f"{self.host.max_positions} positions")
        if self.inference and rows * positions > budgets.max_kv_tokens:
            raise BudgetExceeded(f"the KV cache would hold {rows} rows x {positions} positions = {rows * positions} "
                                 f"tokens, beyond this trunk's budget of {budgets.max_kv_tokens} per session; "
                                 "generate fewer tokens or from a shorter prompt")

    # -------------------------------------------------------------- training

    def _check_open_step(self, step: int) -> None:
        if self.inference:
            raise StepConflict("this is an inference session; open a training session for Forward/Backward "
                               "with micro-batches")
        if step <= self.applied_step:
            raise StepConflict(f"step {step} was already applied (the last applied step is {self.applied_step})")
        if step > self.applied_step + 1:
            raise StepConflict(f"step {step} is more than one step ahead of the last applied step "
                               f"{self.applied_step}; apply step {self.applied_step + 1} (Step) before sending "
                               f"step {self.applied_step + 2} or later")

    def _check_memory(self, what: str, more: int) -> None:
        """BudgetExceeded when ``more`` bytes on top of what the session holds would pass its memory budget."""
        held = self._held_bytes()
        total = sum(held.values()) + more
        budget = self.budgets.max_session_memory_mb << 20
        if total > budget:
            parts = ", ".join(f"{name} {_mib(count)}" for name, count in held.items() if count)
            raise BudgetExceeded(f"{what} would bring this session to {_mib(total)} ({_mib(more)} more on top of "
                                 f"{parts or 'nothing'}), beyond this trunk's budget of "
                                 f"{self.budgets.max_session_memory_mb} MiB per session; send smaller "
                                 "micro-batches, or apply a Step to free the replies kept for retries")

    def forward(self, step: int, micro: int, hidden: torch.Tensor, mask: torch.Tensor, encode) -> object:
        """Training forward; ``encode(tensor)`` builds the reply message (kept for retries until the Backward)."""
        with self.lock:
            key = (step, micro)
            if key in self.forward_replies:
                return self.forward_replies[key].reply
            self._check_open_step(step)
            if key in self.backward_replies:
                raise StepConflict(f"step {step} micro-batch {micro} already went backward; "
                                   "its forward cannot run again in this step")
            self.check_request(hidden, micro=micro)
            what = f"Forward of step {step} micro-batch {micro}"
            # Keeping its graph drops the oldest ones beyond the budget of saved graphs.
            evicted = sum(graph.nbytes for graph in list(self.saved.values())[
                :max(0, len(self.saved) + 1 - self.budgets.max_saved_graphs)])
            reply_bytes = encoded_bytes(hidden.numel(), self.wire_encoding)
            self._check_memory(what, reply_bytes - evicted + self._graph_estimate(hidden))
            saved = self._run_forward(step, micro, hidden, mask)
            self._check_memory(what, reply_bytes - evicted + saved.nbytes)  # a first Forward: checked once it ran
            self._count_tokens("training", hidden)
            self.saved[key] = saved
            while len(self.saved) > self.budgets.max_saved_graphs:
                dropped, _ = self.saved.popitem(last=False)
                log.info("session %s: dropped the graph of step %s micro-batch %s (budget of %s saved graphs); "
                         "its Backward will ask for the inputs", self.id[:8], *dropped, self.budgets.max_saved_graphs)
            reply = encode(saved.output.detach())
            self.forward_replies[key] = Kept(reply, reply_bytes)
            return reply

    def backward(self, step: int, micro: int, grad_output_decoder,
                 resent: tuple[torch.Tensor, torch.Tensor] | None, encode) -> object:
        with self.lock:
            key = (step, micro)
            if key in self.backward_replies:
                return self.backward_replies[key].reply
            self._check_open_step(step)
            what = f"Backward of step {step} micro-batch {micro}"
            saved = self.saved.get(key)
            if saved is None:
                if resent is None:
                    raise ActivationsGone(f"activations of step {step} micro-batch {micro} are not held; "
                                          "send the hidden states and attention mask again to recompute them")
                self.check_request(resent[0], micro=micro)
                inputs = resent[0]
            else:
                inputs = saved.input
            # Its reply is kept until the Step in place of the Forward's, its graph is freed, and the first
            # Backward of a step allocates the gradients.
            reply_bytes = encoded_bytes(inputs.numel(), self.wire_encoding)
            forward_reply = self.forward_replies.get(key)
            more = (reply_bytes + tensor_bytes(p for p in self.params.values() if p.grad is None)
                    - (forward_reply.nbytes if forward_reply else 0) - (saved.nbytes if saved else 0))
            self._check_memory(what, more + (self._graph_estimate(inputs) if saved is None else 0))
            if saved is None:
                saved = self._run_forward(step, micro, *resent)
            else:
                del self.saved[key]
            grad_output = self.host.to_device(grad_output_decoder(tuple(saved.output.shape)))
            self.grad_sq = None  # a Backward that fails half-way may leave some gradients added
            try:
                with self.host.memory_guard(self.id, "Backward", saved.output.shape):
                    self.host.backward(self.adapter, saved.output, grad_output)
            except DeadlinePassed:
                self.saved[key] = saved  # dropped before it ran: the graph is whole, and its retry uses it
                raise
            self.grad_sq = self.grad_sq_norm()
            reply = encode(saved.input.grad, self.grad_sq)
            self.backward_replies[key] = Kept(reply, reply_bytes)
            self.forward_replies.pop(key, None)  # answered: a retry of this Forward cannot come any more
            return reply

    def _run_forward(self, step: int, micro: int, hidden: torch.Tensor, mask: torch.Tensor) -> Saved:
        leaf = self.host.to_device(hidden).detach().requires_grad_(True)
        with (self.host.memory_guard(self.id, "Forward", hidden.shape), torch.enable_grad(),
              saved_storages(self.host.weight_storages()) as storages):
            output = self.host.forward(self.adapter, self.layers, leaf, self.host.to_device(mask), training=True,
                                       seed=dropout_seed(self.dropout_seed, step, micro, TRUNK))
        for tensor in (leaf, output):
            storage = tensor.untyped_storage()
            storages.setdefault(storage.data_ptr(), storage.nbytes())
        nbytes = sum(storages.values())
        self.graph_bytes_per_value = nbytes / leaf.numel()
        return Saved(input=leaf, output=output, nbytes=nbytes)

    def _graph_estimate(self, hidden: torch.Tensor) -> int:
        """The bytes a graph for ``hidden`` will keep, from this session's last Forward (0 before the first)."""
        return int(self.graph_bytes_per_value * hidden.numel())

    def evaluate(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Validation forward of a training session: no gradient, nothing kept."""
        if self.inference:
            raise StepConflict("evaluation forwards are for training sessions; this is an inference session")
        self.check_request(hidden)
        with self.lock, torch.no_grad(), self.host.memory_guard(self.id, "evaluation Forward", hidden.shape):
            output = self.host.forward(self.adapter, self.layers, self.host.to_device(hidden),
                                       self.host.to_device(mask))
            self._count_tokens("evaluation", hidden)
            return output

    def step(self, step: int, lr: float, clip_coef: float) -> int:
        # Training configs allow learning rates up to 1; far above, AdamW's update overflows float32.
        if not (math.isfinite(lr) and 0 <= lr <= 1):
            raise ValueError(f"lr must be a finite number in [0, 1], got {lr}")
        if not (math.isfinite(clip_coef) and 0 < clip_coef <= 1):
            raise ValueError(f"clip_coef must be in (0, 1], got {clip_coef}")
        with self.lock:
            if self.inference:
                raise StepConflict("Step is for training sessions; this is an inference session")
            if step <= self.applied_step:
                return self.applied_step  # a retry: already applied, apply nothing
            if self.optimizer is not None:
                with self.host.computing():
                    # Refused before anything is applied; the gradients stay, so a retry is refused alike.
                    sq_norm = self.grad_sq if self.grad_sq is not None else self.grad_sq_norm()
                    if not math.isfinite(sq_norm):  # one number; the loop only names the culprits
                        bad = [p for p in self.params.values()
                               if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
                        raise ValueError(f"the LoRA gradients of step {step} hold NaN or infinite values (in "
                                         f"{len(bad)} of {_counted(len(self.params), 'weight')}); nothing was "
                                         f"applied: the adapter and its optimizer are as after step "
                                         f"{self.applied_step}; lower the learning rate or check the data")
                    scale_grads(self.params.values(), clip_coef)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.grad_sq = None
            self.applied_step = step
            self.steps_applied += 1
            # The step's calls are answered (the client sends Step after its last Backward): their replies go.
            for replies in (self.forward_replies, self.backward_replies, self.saved):
                for key in [k for k in replies if k[0] <= step]:
                    del replies[key]
            return step

    def grad_sq_norm(self) -> float:
        """Squared norm of the accumulated gradients; inf or nan (never an error) when they are not finite,
        so the client sees it and stops before any Step."""
        return grad_sq_norm(self.params.values())

    # -------------------------------------------------------------- inference

    def infer(self, step: int, hidden: torch.Tensor, mask: torch.Tensor, encode) -> object:
        """Append ``hidden`` to the session's KV cache; ``step`` counts calls from 0 (retries repeat it)."""
        with self.lock:
            if not self.inference:
                raise StepConflict("KV-cache forward needs an inference session")
            if self.last_inference_reply is not None and step == self.last_inference_reply[0]:
                return self.last_inference_reply[1]
            if step != self.inference_steps:
                raise StepConflict(f"inference step {step} is out of order; expected {self.inference_steps}")
            if self.inference_batch is not None and hidden.shape[0] != self.inference_batch:
                raise ValueError(f"hidden has {hidden.shape[0]} rows but this session's KV cache holds "
                                 f"{self.inference_batch}; send the same rows as in the first call")
            past = self.cache.get_seq_length(self.layers.start)
            if mask.shape[1] != past + hidden.shape[1]:
                raise ValueError(f"attention_mask covers {mask.shape[1]} positions; the cache holds {past} and "
                                 f"{hidden.shape[1]} are new, so it must cover {past + hidden.shape[1]}")
            self.check_request(hidden, positions=past + hidden.shape[1])
            try:
                with torch.no_grad(), self.host.memory_guard(self.id, "inference Forward", hidden.shape):
                    output = self.host.forward(self.adapter, self.layers, self.host.to_device(hidden),
                                               self.host.to_device(mask), past_key_values=self.cache)
            except BaseException:
                if self.cache.get_seq_length(self.layers.start) > past:
                    self.cache.crop(past)  # a failed call leaves the cache as it was
                raise
            reply = encode(output)
            self._count_tokens("inference", hidden)
            self.inference_batch = hidden.shape[0]
            self.inference_steps += 1
            self.last_inference_reply = (step, reply)
            return reply

    # -------------------------------------------------------------- state

    def export_state(self) -> bytes:
        with self.lock:
            adapter = {} if self.adapter is None else self.host.adapter_state(self.adapter)
            optimizer = None if self.optimizer is None else adamw_state_tensors(
                self.optimizer, self.params, trunk_state.OPTIMIZER_PREFIX)
            return trunk_state.pack(adapter, optimizer, self.applied_step)

    def _snapshot(self) -> tuple[dict | None, dict | None]:
        adapter = None if self.adapter is None else self.host.adapter_state(self.adapter)  # a copy
        optimizer = None if self.optimizer is None else copy.deepcopy(self.optimizer.state_dict())
        return adapter, optimizer

    def _restore(self, snapshot: tuple[dict | None, dict | None]) -> None:
        adapter, optimizer = snapshot
        if adapter is not None:
            self.host.load_adapter_state(self.adapter, adapter)
        if optimizer is not None:
            self.optimizer.load_state_dict(optimizer)

    def import_state(self, step: int, data: bytes) -> int:
        state = trunk_state.unpack(data)
        with self.lock:
            if self.adapter is None and (state.adapter or state.optimizer):
                raise ValueError("this session has no trunk LoRA, but the state holds weights")
            if state.optimizer and self.optimizer is None:
                raise ValueError("optimizer state given for a session without a trunk optimizer")
            before = self._snapshot()
            try:  # all or nothing: a state refused half-way leaves the session as it was
                if self.adapter is not None:
                    self.host.load_adapter_state(self.adapter, state.adapter)
                if self.optimizer is not None:
                    load_adamw_state(self.optimizer, self.params, state.optimizer, trunk_state.OPTIMIZER_PREFIX)
            except BaseException:
                self._restore(before)
                raise
            for param in self.params.values():
                param.grad = None
            self.grad_sq = None
            self.saved.clear()
            self.forward_replies.clear()
            self.backward_replies.clear()
            self.applied_step = step
            return step

    # -------------------------------------------------------------- memory

    def memory_bytes(self) -> int:
        """Bytes this session holds: adapter, gradients, optimizer state, saved graphs, kept replies, KV cache
        (counted between calls: while one runs, the count from before it)."""
        if not self.lock.acquire(blocking=False):
            return self.counted_bytes
        try:
            self.counted_bytes = self._count_bytes()
        finally:
            self.lock.release()
        return self.counted_bytes

    def _count_bytes(self) -> int:
        return sum(self._held_bytes().values())

    def _held_bytes(self) -> dict[str, int]:
        """Under the lock: what the session holds, by kind."""
        optimizer = [] if self.optimizer is None else [
            v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        cache = [t for layer in getattr(self.cache, "layers", ())
                 for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if torch.is_tensor(t)]
        return {
            "adapter": tensor_bytes(self.params.values()),
            "gradients": tensor_bytes(p.grad for p in self.params.values()),
            "optimizer state": tensor_bytes(optimizer),
            "saved graphs": sum(saved.nbytes for saved in self.saved.values()),
            "kept replies": sum(kept.nbytes for replies in (self.forward_replies, self.backward_replies)
                                for kept in replies.values()),
            "KV cache": tensor_bytes(cache),
        }

    def release(self) -> None:
        with self.lock:
            self.saved.clear()
            self.forward_replies.clear()
            self.backward_replies.clear()
            self.cache = None
            if self.adapter is not None:
                self.host.remove_adapter(self.adapter)


@dataclass(frozen=True)
class SessionRequest:
    """What a client asks OpenSession for (the open key aside)."""

    inference: bool
    lora: tuple[LoraSettings, int] | None
    optimizer: OptimizerSettings
    wire_encoding: str
    label: str
    layers: range
    dropout_seed: int = 0

    def digest(self) -> str:
        return hashlib.sha256(repr(self).encode()).hexdigest()


class SessionRegistry:
    def __init__(self, host: TrunkHost, max_sessions: int, lease_s: float, budgets: SessionBudgets) -> None:
        self.host = host
        self.max_sessions = max_sessions
        self.lease_s = lease_s
        self.budgets = budgets
        self.stats = host.stats
        self._sessions: dict[str, Session | None] = {}  # None: a reserved slot, the session is being created
        self._by_key: dict[str, tuple[str, str]] = {}  # open key -> (session id, request digest)
        # Guards the tables; a retried open waits on it while the first try creates the session.
        self._lock = threading.Condition()

    # -------------------------------------------------------------- lifecycle

    def active_count(self) -> int:
        self.expire()
        with self._lock:
            return len(self._sessions)

    def sessions_bytes(self) -> int:
        with self._lock:
            sessions = [s for s in self._sessions.values() if s is not None]
        return sum(session.memory_bytes() for session in sessions)

    def open(self, request: SessionRequest, open_key: str = "") -> tuple[Session, bool]:
        """The session for ``request``: a new one, or (same ``open_key``) the one a first try opened.
        Returns (session, opened now)."""
        if len(open_key) > MAX_OPEN_KEY:
            raise ValueError(f"open_key is {len(open_key)} characters long; at most {MAX_OPEN_KEY}")
        if request.lora is not None and request.lora[0].has_rank and request.lora[0].r > self.budgets.max_lora_rank:
            raise BudgetExceeded(f"LoRA rank {request.lora[0].r} is beyond this trunk's budget of rank "
                                 f"{self.budgets.max_lora_rank}; choose a rank of at most {self.budgets.max_lora_rank}")
        self.expire()
        digest = request.digest()
        session_id = secrets.token_hex(16)
        with self._lock:
            existing = self._existing(open_key, digest)
            if existing is not None:
                return existing, False
            if len(self._sessions) >= self.max_sessions:
                raise TrunkFull(f"the trunk is at its capacity of {self.max_sessions} sessions; "
                                "try again when a session closes")
            # Reserve the slot (and the key) before the (slow) adapter creation.
            self._sessions[session_id] = None
            if open_key:
                self._by_key[open_key] = (session_id, digest)
        try:
            session = self._create(session_id, request, open_key)
        except BaseException:
            with self._lock:
                self._sessions.pop(session_id, None)
                self._by_key.pop(open_key, None)
                self._lock.notify_all()
            raise
        with self._lock:
            self._sessions[session_id] = session
            self._lock.notify_all()
        self.stats.session_opened(session.mode)
        return session, True

    def _existing(self, open_key: str, digest: str) -> Session | None:
        """Under the lock: the session a first try with ``open_key`` opened (waiting while it is created)."""
        while open_key and open_key in self._by_key:
            session_id, first_digest = self._by_key[open_key]
            if first_digest != digest:
                raise ValueError("open_key was already used for a different OpenSession request; "
                                 "use a new key for each session")
            session = self._sessions.get(session_id)
            if session is not None:
                session.last_used = time.monotonic()
                return session
            self._lock.wait(timeout=1.0)
        return None

    def _create(self, session_id: str, request: SessionRequest, open_key: str) -> Session:
        adapter, params, optim = None, {}, None
        if request.lora is not None:
            adapter = f"s{session_id}"
            settings, seed = request.lora
            params = self.host.add_adapter(adapter, settings, seed, request.layers)
            if not request.inference:
                optim = new_adamw(params.values(), request.optimizer)
        session = Session(id=session_id, host=self.host, budgets=self.budgets, inference=request.inference,
                          layers=request.layers, adapter=adapter, params=params, optimizer=optim,
                          wire_encoding=request.wire_encoding, label=request.label, last_used=time.monotonic(),
                          dropout_seed=request.dropout_seed, open_key=open_key)
        if request.inference:
            session.cache = DynamicCache(config=self.host.config)
        return session

    def get(self, session_id: str) -> Session:
        """The session, its lease renewed; SessionGone when there is none."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None:
                session.last_used = time.monotonic()
        if session is None:
            raise SessionGone(f"unknown session {session_id[:64]!r} (closed, its lease of {self.lease_s:g} s ran "
                              "out, or the server restarted)")
        return session

    @contextlib.contextmanager
    def use(self, session_id: str):
        """The session for the length of one call: its lease is renewed at both ends, and it does not
        expire while the call runs (however long it waits for the model)."""
        session = self.get(session_id)
        with self._lock:
            session.calls += 1
        try:
            yield session
        finally:
            with self._lock:
                session.calls -= 1
                session.last_used = time.monotonic()

    def close(self, session_id: str) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                raise SessionGone(f"unknown session {session_id[:64]!r}")
            self._forget(session)
        self._ended(session, "closed", "closed session %s for %r: %s")
        return session

    def close_all(self) -> None:
        with self._lock:
            sessions = [s for s in self._sessions.values() if s is not None]
            for session in sessions:
                self._forget(session)
        for session in sessions:
            self._ended(session, "closed", "closed session %s for %r at shutdown: %s")

    def expire(self) -> list[Session]:
        """Close the sessions whose lease ran out; returns them."""
        now = time.monotonic()
        with self._lock:
            stale = [s for s in self._sessions.values()
                     if s is not None and not s.calls and now - s.last_used > self.lease_s]
            for session in stale:
                self._forget(session)
        for session in stale:
            idle = f"{now - session.last_used:.1f}"
            self._ended(session, "expired", f"session %s for %r expired: no call for {self.lease_s:g}s "
                                            f"(its lease), idle for {idle} s; %s")
        return stale

    def _ended(self, session: Session, how: str, line: str) -> None:
        """Out of the lock: free the session's tensors, count its end and log ``line`` (id, label, summary)."""
        session.release()
        release_free_memory()  # what its activations and optimizer took goes back to the system now
        self.stats.session_ended(how)
        log.info(line, session.id[:8], session.label, session.summary())

    def _forget(self, session: Session) -> None:
        """Under the lock: drop the session and its open key from the tables."""
        self._sessions.pop(session.id, None)
        if session.open_key:
            self._by_key.pop(session.open_key, None)
