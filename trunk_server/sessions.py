"""Sessions: one client's trunk adapter, optimizer, saved activations and replies.

Steps are idempotent. Replies to Forward and Backward are kept per (step, micro_batch)
until the next optimizer step, so a retried call returns the same answer and never
accumulates gradients twice; a retried Step for an applied step changes nothing.
"""

from __future__ import annotations

import copy
import io
import math
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from transformers import DynamicCache

from splitcore.model.lora import LoraSettings
from splitcore.training.optim_state import adamw_state_tensors, load_adamw_state
from splitcore.remote.messages import OptimizerSettings
from splitcore.model.seeding import TRUNK, dropout_seed

from .host import TrunkHost

ADAPTER_PREFIX = "adapter."
OPTIMIZER_PREFIX = "optimizer."


class SessionNotFound(LookupError):
    pass


class CapacityExceeded(RuntimeError):
    pass


class ActivationsGone(RuntimeError):
    """Backward for a micro-batch whose activations are no longer held, without the inputs to recompute."""


class StepConflict(ValueError):
    """A call for a step that was already applied, or that breaks the step order."""


@dataclass
class Saved:
    input: torch.Tensor  # (batch, seq, hidden), requires grad
    output: torch.Tensor  # (batch, seq, hidden), part of the autograd graph


@dataclass
class Session:
    id: str
    inference: bool
    layers: range  # the decoder blocks this session runs
    adapter: str | None
    params: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer | None
    wire_encoding: str
    label: str
    last_used: float
    dropout_seed: int = 0
    applied_step: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    saved: OrderedDict = field(default_factory=OrderedDict)
    forward_replies: dict = field(default_factory=dict)
    backward_replies: dict = field(default_factory=dict)
    cache: DynamicCache | None = None
    inference_steps: int = 0
    last_inference_reply: tuple[int, object] | None = None
    inference_batch: int | None = None  # rows in the KV cache, fixed by the first inference call

    def grad_sq_norm(self) -> float:
        total = 0.0
        for param in self.params.values():
            if param.grad is not None:
                total += float(param.grad.detach().double().pow(2).sum())
        return total


class SessionRegistry:
    def __init__(self, host: TrunkHost, max_sessions: int, ttl_s: float, max_saved: int) -> None:
        self.host = host
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self.max_saved = max_saved
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    # -------------------------------------------------------------- lifecycle

    def active_count(self) -> int:
        self.expire()
        with self._lock:
            return len(self._sessions)

    def open(self, inference: bool, lora: tuple[LoraSettings, int] | None, optimizer: OptimizerSettings,
             wire_encoding: str, label: str, layers: range, dropout_seed: int = 0) -> Session:
        self.expire()
        session_id = secrets.token_hex(16)
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise CapacityExceeded(f"the trunk is at its capacity of {self.max_sessions} sessions; "
                                       "try again when a session closes")
            # Reserve the slot before the (slow) adapter creation.
            self._sessions[session_id] = None  # type: ignore[assignment]
        try:
            adapter, params, optim = None, {}, None
            if lora is not None:
                adapter = f"s{session_id}"
                settings, seed = lora
                params = self.host.add_adapter(adapter, settings, seed, layers)
                if not inference:
                    optim = torch.optim.AdamW(list(params.values()), lr=0.0, betas=(optimizer.beta1, optimizer.beta2),
                                              eps=optimizer.eps, weight_decay=optimizer.weight_decay)
            session = Session(id=session_id, inference=inference, layers=layers, adapter=adapter, params=params,
                              optimizer=optim,
                              wire_encoding=wire_encoding, label=label, last_used=time.monotonic(),
                              dropout_seed=dropout_seed)
            if inference:
                session.cache = DynamicCache(config=self.host.config)
        except BaseException:
            with self._lock:
                self._sessions.pop(session_id, None)
            raise
        with self._lock:
            self._sessions[session_id] = session
        return session

    def get(self, session_id: str) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFound(f"unknown session {session_id[:64]!r} (closed, expired, or the server restarted)")
        session.last_used = time.monotonic()
        return session

    def close(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            raise SessionNotFound(f"unknown session {session_id[:64]!r}")
        self._release(session)

    def close_all(self) -> None:
        with self._lock:
            sessions = [s for s in self._sessions.values() if s is not None]
            self._sessions.clear()
        for session in sessions:
            self._release(session)

    def expire(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            stale = [sid for sid, s in self._sessions.items() if s is not None and now - s.last_used > self.ttl_s]
            sessions = [self._sessions.pop(sid) for sid in stale]
        for session in sessions:
            self._release(session)
        return stale

    def _release(self, session: Session) -> None:
        with session.lock:
            session.saved.clear()
            session.cache = None
            if session.adapter is not None:
                self.host.remove_adapter(session.adapter)

    # -------------------------------------------------------------- training

    def forward(self, session: Session, step: int, micro: int, hidden: torch.Tensor,
                mask: torch.Tensor, encode) -> object:
        """Training forward; ``encode(tensor)`` builds the reply message (cached for retries)."""
        with session.lock:
            key = (step, micro)
            if key in session.forward_replies:
                return session.forward_replies[key]
            self._check_open_step(session, step)
            saved = self._run_forward(session, step, micro, hidden, mask)
            session.saved[key] = saved
            while len(session.saved) > self.max_saved:
                session.saved.popitem(last=False)
            reply = encode(saved.output.detach())
            session.forward_replies[key] = reply
            return reply

    def backward(self, session: Session, step: int, micro: int, grad_output_decoder,
                 resent: tuple[torch.Tensor, torch.Tensor] | None, encode) -> object:
        with session.lock:
            key = (step, micro)
            if key in session.backward_replies:
                return session.backward_replies[key]
            self._check_open_step(session, step)
            saved = session.saved.pop(key, None)
            if saved is None:
                if resent is None:
                    raise ActivationsGone(f"activations of step {step} micro-batch {micro} are not held; "
                                          "resend the hidden states and attention mask to recompute")
                saved = self._run_forward(session, step, micro, *resent)
            grad_output = grad_output_decoder(tuple(saved.output.shape))
            self.host.backward(session.adapter, saved.output, grad_output)
            reply = encode(saved.input.grad, session.grad_sq_norm())
            session.backward_replies[key] = reply
            return reply

    def step(self, session: Session, step: int, lr: float, clip_coef: float) -> int:
        # Training configs allow learning rates up to 1; far above, AdamW's update overflows float32.
        if not (math.isfinite(lr) and 0 <= lr <= 1):
            raise ValueError(f"lr must be a finite number in [0, 1], got {lr}")
        if not (math.isfinite(clip_coef) and 0 < clip_coef <= 1):
            raise ValueError(f"clip_coef must be in (0, 1], got {clip_coef}")
        with session.lock:
            if session.inference:
                raise StepConflict("Step is for training sessions; this is an inference session")
            if step <= session.applied_step:
                return session.applied_step  # a retry: already applied, apply nothing
            if session.optimizer is not None:
                with self.host.lock:
                    for param in session.params.values():
                        if param.grad is not None:
                            param.grad.mul_(clip_coef)
                    for group in session.optimizer.param_groups:
                        group["lr"] = lr
                    session.optimizer.step()
                    session.optimizer.zero_grad(set_to_none=True)
            session.applied_step = step
            for replies in (session.forward_replies, session.backward_replies, session.saved):
                for key in [k for k in replies if k[0] < step]:
                    del replies[key]
            return step

    def _check_open_step(self, session: Session, step: int) -> None:
        if session.inference:
            raise StepConflict("this is an inference session; open a training session for Forward/Backward "
                               "with micro-batches")
        if step <= session.applied_step:
            raise StepConflict(f"step {step} was already applied (the last applied step is "
                               f"{session.applied_step})")

    def _run_forward(self, session: Session, step: int, micro: int, hidden: torch.Tensor,
                     mask: torch.Tensor) -> Saved:
        leaf = hidden.detach().requires_grad_(True)
        with torch.enable_grad():
            output = self.host.forward(session.adapter, session.layers, leaf, mask, training=True,
                                       seed=dropout_seed(session.dropout_seed, step, micro, TRUNK))
        return Saved(input=leaf, output=output)

    def evaluate(self, session: Session, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Validation forward of a training session: no gradient, nothing kept."""
        if session.inference:
            raise StepConflict("evaluation forwards are for training sessions; this is an inference session")
        with session.lock, torch.no_grad():
            return self.host.forward(session.adapter, session.layers, hidden, mask)

    # -------------------------------------------------------------- inference

    def infer(self, session: Session, step: int, hidden: torch.Tensor, mask: torch.Tensor, encode) -> object:
        """Append ``hidden`` to the session's KV cache; ``step`` counts calls from 0 (retries repeat it)."""
        with session.lock:
            if not session.inference:
                raise StepConflict("KV-cache forward needs an inference session")
            if session.last_inference_reply is not None and step == session.last_inference_reply[0]:
                return session.last_inference_reply[1]
            if step != session.inference_steps:
                raise StepConflict(f"inference step {step} is out of order; expected {session.inference_steps}")
            if session.inference_batch is not None and hidden.shape[0] != session.inference_batch:
                raise ValueError(f"hidden has {hidden.shape[0]} rows but this session's KV cache holds "
                                 f"{session.inference_batch}; send the same rows as in the first call")
            past = session.cache.get_seq_length(session.layers.start)
            if mask.shape[1] != past + hidden.shape[1]:
                raise ValueError(f"attention_mask covers {mask.shape[1]} positions; the cache holds {past} and "
                                 f"{hidden.shape[1]} are new, so it must cover {past + hidden.shape[1]}")
            with torch.no_grad():
                output = self.host.forward(session.adapter, session.layers, hidden, mask,
                                           past_key_values=session.cache)
            reply = encode(output)
            session.inference_batch = hidden.shape[0]
            session.inference_steps += 1
            session.last_inference_reply = (step, reply)
            return reply

    # -------------------------------------------------------------- state

    def export_state(self, session: Session) -> bytes:
        with session.lock:
            tensors: dict[str, torch.Tensor] = {}
            if session.adapter is not None:
                tensors.update({ADAPTER_PREFIX + k: v for k, v in self.host.adapter_state(session.adapter).items()})
            if session.optimizer is not None:
                tensors.update(adamw_state_tensors(session.optimizer, session.params, OPTIMIZER_PREFIX))
            metadata = {"format": "splitlearn-trunk-state-v1", "applied_step": str(session.applied_step)}
            return save_safetensors(tensors, metadata=metadata)

    def _snapshot(self, session: Session) -> tuple[dict | None, dict | None]:
        adapter = None if session.adapter is None else self.host.adapter_state(session.adapter)  # a copy
        optimizer = None if session.optimizer is None else copy.deepcopy(session.optimizer.state_dict())
        return adapter, optimizer

    def _restore(self, session: Session, snapshot: tuple[dict | None, dict | None]) -> None:
        adapter, optimizer = snapshot
        if adapter is not None:
            self.host.load_adapter_state(session.adapter, adapter)
        if optimizer is not None:
            session.optimizer.load_state_dict(optimizer)

    def import_state(self, session: Session, step: int, data: bytes) -> int:
        try:
            tensors = load_safetensors(data) if data else {}
        except (SafetensorError, ValueError, io.UnsupportedOperation) as exc:
            raise ValueError(f"state is not a valid safetensors file: {exc}") from exc
        with session.lock:
            adapter = {k[len(ADAPTER_PREFIX):]: v for k, v in tensors.items() if k.startswith(ADAPTER_PREFIX)}
            optimizer = {k: v for k, v in tensors.items() if k.startswith(OPTIMIZER_PREFIX)}
            other = set(tensors) - {ADAPTER_PREFIX + k for k in adapter} - set(optimizer)
            if other:
                raise ValueError(f"state holds an unknown entry {sorted(other)[0]!r}")
            if session.adapter is None and tensors:
                raise ValueError("this session has no trunk LoRA, but the state holds weights")
            if optimizer and session.optimizer is None:
                raise ValueError("optimizer state given for a session without a trunk optimizer")
            before = self._snapshot(session)
            try:  # all or nothing: a state refused half-way leaves the session as it was
                if session.adapter is not None:
                    self.host.load_adapter_state(session.adapter, adapter)
                if session.optimizer is not None:
                    load_adamw_state(session.optimizer, session.params, optimizer, OPTIMIZER_PREFIX)
            except BaseException:
                self._restore(session, before)
                raise
            for param in session.params.values():
                param.grad = None
            session.saved.clear()
            session.forward_replies.clear()
            session.backward_replies.clear()
            session.applied_step = step
            return step
