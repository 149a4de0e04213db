"""A key that never leaves the data owner, from which every seed the trunk is sent is derived.

The trunk needs seeds (its LoRA initialisation, its dropout masks) so that a run is
reproducible and resumable. Sending the run's own seed would hand the trunk owner the
client's LoRA initialisation, dropout masks and the noise drawn to blur what it sees; so
the trunk gets ``HMAC(key, purpose:seed)`` instead. Without the key, those values tell it
nothing about the run's seed or the client's draws.

One key per run: the web app draws a key for each job; the CLI keeps one key file per
machine and mixes a fresh random nonce into it for each run (``with_nonce``), so two runs
with the same seed never share noise, a private Bottom or a trunk seed. A resumed run
reuses its checkpoint's nonce (``resume_record`` is what a checkpoint records).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_BYTES = 32
# The seed handed to the trunk, for its LoRA initialisation and its dropout masks.
TRUNK_SEED = "trunk-seed"
# Seeds of the client's own noise draws (never sent anywhere).
HIDDEN_NOISE = "hidden-noise"
GRAD_NOISE = "grad-noise"
# Noise on the hidden states of a validation batch (per evaluation step and batch).
EVAL_HIDDEN_NOISE = "eval-hidden-noise"
# Noise on the hidden states a generation sends (per decoding position).
GENERATION_HIDDEN_NOISE = "generation-hidden-noise"
NONCE_BYTES = 16
MIN_NONCE_BYTES = 8


class ClientSecret:
    """A 32-byte key held by the data owner only."""

    def __init__(self, key: bytes, nonce: bytes | None = None) -> None:
        """``nonce``: the run's nonce when ``key`` is already mixed with it (see ``with_nonce``); recorded only."""
        if not isinstance(key, bytes) or len(key) < 16:
            raise ValueError(f"a client secret needs at least 16 bytes of key, got {len(key) if isinstance(key, bytes) else type(key).__name__}")
        self._key = key
        self._nonce = nonce

    @property
    def nonce(self) -> bytes | None:
        """The run's nonce mixed into this key (public: without the key it derives nothing), or None."""
        return self._nonce

    @classmethod
    def generate(cls) -> ClientSecret:
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def from_text(cls, text: str, context: str = "splitlearn client secret") -> ClientSecret:
        """A key derived from a long secret string (e.g. the web app's SECRET_KEY)."""
        if len(text) < 16:
            raise ValueError("a client secret must be derived from at least 16 characters")
        return cls(hmac.new(text.encode(), context.encode(), hashlib.sha256).digest())

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> ClientSecret:
        """The key stored in ``path`` (hex), created there (mode 0600) when missing.

        Created under a temporary name and linked into place, so concurrent runs agree on one key.
        """
        path = Path(path)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
            descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_bytes(KEY_BYTES).hex() + "\n")
            try:
                os.link(staging, path)
            except FileExistsError:
                pass  # another run created it first: use theirs
            finally:
                staging.unlink()
        text = path.read_text().strip()
        try:
            return cls(bytes.fromhex(text))
        except ValueError:
            raise ValueError(f"{path}: a client secret file holds {KEY_BYTES * 2} hex digits") from None

    def with_nonce(self, nonce: bytes) -> ClientSecret:
        """The key of one run: ``HMAC(key, "nonce:" + nonce)``. Every seed and draw derives from it, so runs
        with the same key file and seed but another nonce share nothing; the same nonce repeats the run."""
        if not isinstance(nonce, bytes) or len(nonce) < MIN_NONCE_BYTES:
            raise ValueError(f"a run's nonce needs at least {MIN_NONCE_BYTES} bytes, got "
                             f"{len(nonce) if isinstance(nonce, bytes) else type(nonce).__name__}")
        if self.nonce is not None:
            raise ValueError("this key already has a run's nonce mixed in; mix the nonce into the key file's key")
        return ClientSecret(hmac.new(self._key, b"nonce:" + nonce, hashlib.sha256).digest(), nonce=nonce)

    @staticmethod
    def fresh_nonce() -> bytes:
        return secrets.token_bytes(NONCE_BYTES)

    def derive(self, purpose: str, *values: int) -> int:
        """A 63-bit seed for ``purpose`` and ``values`` (e.g. the run seed, a step, a micro-batch)."""
        message = ":".join([purpose, *(str(int(v)) for v in values)]).encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return int.from_bytes(digest[:8], "big") >> 1  # torch seeds are < 2**63

    def trunk_seed(self, run_seed: int) -> int:
        """What the trunk is sent instead of ``run_seed``."""
        return self.derive(TRUNK_SEED, run_seed)

    def fingerprint(self) -> str:
        """A short public tag of the key, so a resumed run can tell it holds the same key."""
        return hmac.new(self._key, b"fingerprint", hashlib.sha256).hexdigest()[:16]

    def resume_record(self) -> dict[str, str]:
        """What a checkpoint records of the key: its fingerprint, and the run's nonce (public: without the
        key it derives nothing) when one is mixed in, so that a resume can mix in the same one."""
        record = {"client_secret": self.fingerprint()}
        if self.nonce is not None:
            record["client_nonce"] = self.nonce.hex()
        return record

    def __repr__(self) -> str:  # never print the key
        return f"ClientSecret(fingerprint={self.fingerprint()})"
