"""Trunk server settings, validated once at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from splitcore.model.devices import DTYPES, resolve_device


@dataclass(frozen=True)
class SessionBudgets:
    """What one session may hold or ask for; a request beyond one is refused (RESOURCE_EXHAUSTED,
    reason "budget") and the session and every other session go on."""

    # Micro-batch indices of one step: 0 .. max_micro_batches - 1 (bounds the replies kept per step).
    max_micro_batches: int = 64
    # Rows x positions of one Forward or Backward (and of one inference call).
    max_tokens_per_request: int = 16384
    # Autograd graphs kept for Backward; beyond it the oldest is dropped and its Backward asks for
    # the inputs again (a client that runs Forward then Backward per micro-batch keeps one).
    max_saved_graphs: int = 4
    # Rows x positions an inference session's KV cache may hold.
    max_kv_tokens: int = 32768
    # LoRA rank of a session's trunk adapter.
    max_lora_rank: int = 256
    # MiB one session may hold: adapter, gradients, optimizer state, the tensors its saved graphs keep
    # for Backward, the replies kept for retries until the Step, the KV cache.
    max_session_memory_mb: int = 8192

    def __post_init__(self) -> None:
        for name in (budget.name for budget in fields(self)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be a whole number of at least 1, got {value!r}")


@dataclass(frozen=True)
class TrunkServerConfig:
    """``n_bottom``/``n_top``: the default cut. ``min_bottom``/``min_top`` (None: the defaults) are
    the fewest blocks a session may leave to its client on each side: the server holds the
    blocks between them, and each session runs the sub-range its client asks for.

    ``layers`` (first, last; instead of the cut) serves exactly the blocks ``first``..``last``: a
    link of a chain of trunks, or a trunk of a fixed range. Sessions run any sub-range of it."""

    model_dir: Path
    n_bottom: int | None
    n_top: int | None
    token: str
    layers: tuple[int, int] | None = None
    min_bottom: int | None = None
    min_top: int | None = None
    host: str = "127.0.0.1"
    port: int = 50051
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Where the frozen blocks run and in which dtype; LoRA weights and optimizer state stay fp32.
    device: str = "cpu"
    dtype: str = "fp32"
    max_sessions: int = 8
    # A session's lease: closed when no call renews it for this long.
    session_lease_s: int = 120
    budgets: SessionBudgets = field(default_factory=SessionBudgets)
    # Upper bound of one gRPC message; tensors above it are streamed in chunks.
    max_message_bytes: int = 8 << 20
    # Upper bound of one reassembled request (all chunks of a stream).
    max_request_bytes: int = 1 << 30
    max_concurrent_rpcs: int = 32
    worker_threads: int = 16
    # Prometheus metrics at http://metrics_host:metrics_port/metrics; None: off (0 picks a free port).
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if not self.token or len(self.token) < 16:
            raise ValueError("the trunk token must be at least 16 characters (use --token-file or TRUNK_TOKEN)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.metrics_port is not None:
            metrics_port = self.metrics_port
            if isinstance(metrics_port, bool) or not isinstance(metrics_port, int) or not 0 <= metrics_port <= 65535:
                raise ValueError(f"metrics port must be in [0, 65535] (0: a free one), got {metrics_port!r}")
            if metrics_port and metrics_port == self.port:
                raise ValueError(f"the metrics port {metrics_port} is the gRPC port; choose another one")
            if not self.metrics_host:
                raise ValueError("metrics host must not be empty (e.g. 127.0.0.1, or 0.0.0.0 for every interface)")
        for name in ("max_sessions", "session_lease_s", "max_concurrent_rpcs", "worker_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.layers is not None:
            self._check_layers()
        elif self.n_bottom is None or self.n_top is None:
            raise ValueError("say which blocks the trunk serves: --layers FIRST-LAST, or the default cut "
                             "(--bottom-layers and --top-layers)")
        for name, default in (("min_bottom", "n_bottom"), ("min_top", "n_top")):
            value = getattr(self, name)
            if self.layers is not None:
                continue
            if value is None:
                object.__setattr__(self, name, getattr(self, default))
            elif isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= getattr(self, default):
                raise ValueError(f"{name.replace('_', ' ')} layers must be from 1 to the default cut's "
                                 f"{getattr(self, default)}, got {value!r}")
        if self.max_message_bytes < 1 << 16:
            raise ValueError(f"max_message_bytes must be at least 65536, got {self.max_message_bytes}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        object.__setattr__(self, "device", resolve_device(self.device))

    def _check_layers(self) -> None:
        given = [f"--{name.replace('_', '-')}" for name, flag in (
            ("bottom_layers", self.n_bottom), ("top_layers", self.n_top), ("min_bottom_layers", self.min_bottom),
            ("min_top_layers", self.min_top)) if flag is not None]
        if given:
            raise ValueError(f"--layers names the blocks this trunk serves; it does not go with {', '.join(given)}")
        first, last = self.layers
        for value in (first, last):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"layers must be whole numbers, got {self.layers!r}")
        if not 1 <= first <= last:
            raise ValueError(f"layers {first}-{last}: the first must be at least 1 (block 0 stays with the "
                             "client) and at most the last")

    @property
    def chunk_bytes(self) -> int:
        """Payload per streamed message, leaving room for the message's other fields."""
        return self.max_message_bytes // 2

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
