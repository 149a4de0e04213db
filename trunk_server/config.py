"""Trunk server settings, validated once at start-up."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TrunkServerConfig:
    """``n_bottom``/``n_top``: the default cut. ``min_bottom``/``min_top`` (None: the defaults) are
    the fewest blocks a session may leave to its client on each side: the server holds the
    blocks between them, and each session runs the sub-range its client asks for."""

    model_dir: Path
    n_bottom: int
    n_top: int
    token: str
    min_bottom: int | None = None
    min_top: int | None = None
    host: str = "127.0.0.1"
    port: int = 50051
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_sessions: int = 8
    session_ttl_s: int = 1800
    # Upper bound of one gRPC message; tensors above it are streamed in chunks.
    max_message_bytes: int = 8 << 20
    # Upper bound of one reassembled request (all chunks of a stream).
    max_request_bytes: int = 1 << 30
    max_concurrent_rpcs: int = 32
    worker_threads: int = 16
    # Activations kept per session for Backward; older ones are recomputed on demand.
    max_saved_activations: int = 64

    def __post_init__(self) -> None:
        if not self.token or len(self.token) < 16:
            raise ValueError("the trunk token must be at least 16 characters (use --token-file or TRUNK_TOKEN)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for name in ("max_sessions", "session_ttl_s", "max_concurrent_rpcs", "worker_threads",
                     "max_saved_activations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name, default in (("min_bottom", "n_bottom"), ("min_top", "n_top")):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, getattr(self, default))
            elif isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= getattr(self, default):
                raise ValueError(f"{name.replace('_', ' ')} layers must be from 1 to the default cut's "
                                 f"{getattr(self, default)}, got {value!r}")
        if self.max_message_bytes < 1 << 16:
            raise ValueError(f"max_message_bytes must be at least 65536, got {self.max_message_bytes}")

    @property
    def chunk_bytes(self) -> int:
        """Payload per streamed message, leaving room for the message's other fields."""
        return self.max_message_bytes // 2
