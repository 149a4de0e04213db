"""A model directory's safetensors weights, read one tensor at a time.

A checkpoint is one ``model.safetensors`` or shards listed by ``model.safetensors.index.json``.
Nothing is read until a tensor is asked for: the reader finds the file that holds it, reads
that tensor alone, casts it to the caller's dtype and places it on the caller's device. So a
process that runs a few blocks of a 70B model reads those blocks and nothing else, and never
holds a tensor in two dtypes at once beyond the one being cast.

A tensor stored in the dtype asked for is not copied: it stays a view of the file's memory
mapping, so its pages come from the page cache as they are first used, and processes on one
machine that read the same checkpoint (a trunk and worker slots, several slots) share one
copy of them. Such a process must not outlive a change to its checkpoint's files: replace a
model by writing a new directory, never by rewriting files in place. A tensor that is cast
(an fp32 checkpoint computed in bf16) is copied in its new dtype, one tensor at a time.

Every tensor read is recorded in ``keys_read``, so a test (or an operator) can see exactly
what a process took from the checkpoint.

``digest`` hashes a tensor's bytes straight from the file in fixed-size chunks, without
building the tensor: a client checks that a trunk serves the weights it expects without
loading them. The digest equals ``fingerprint.tensor_digests`` of the loaded tensor
(name, shape, the stored dtype, the little-endian bytes), so old and new peers agree. With a
``digest_cache`` directory the digests of each file are kept there (as JSON, valid while the
file keeps its size and modification time), so the bytes of a 70B trunk are hashed once per
machine, not once per run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Bytes read per chunk while hashing a tensor on disk.
DIGEST_CHUNK = 1 << 20
# safetensors' dtype names, as torch names them.
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(ValueError):
    """The directory holds no usable safetensors checkpoint; the message says what to do."""


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies: its file, dtype and shape as stored, and its byte range in the file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file, from its JSON header (8 bytes of length, then the header)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 * (1 << 20):
                raise CheckpointError(f"{path}: a safetensors header of {length} bytes is not plausible")
            header = json.loads(handle.read(length))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    base = 8 + length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {entry.get('dtype')!r}, which is not supported")
        start, end = entry["data_offsets"]
        tensors[name] = StoredTensor(file=path, dtype=dtype, shape=tuple(entry["shape"]), start=base + start,
                                     end=base + end)
    return tensors


class Checkpoint:
    """The safetensors weights of a model directory: what is stored where, read on demand."""

    def __init__(self, model_dir: str | os.PathLike, digest_cache: str | os.PathLike | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.digest_cache = Path(digest_cache) if digest_cache is not None else None
        self._file_digests: dict[Path, dict[str, str]] = {}  # per file: name -> hex digest
        self._unsaved: set[Path] = set()
        index = self.model_dir / INDEX_FILE
        single = self.model_dir / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is not a safetensors index (no weight_map): {exc}") from exc
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files = [SINGLE_FILE]
        else:
            others = sorted(p.name for p in self.model_dir.glob("*.bin")) if self.model_dir.is_dir() else []
            hint = (f"; it holds {', '.join(others[:3])} (pickle): convert it to safetensors once, e.g. "
                    "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir)") if others else ""
            raise CheckpointError(f"{self.model_dir} has no {SINGLE_FILE} and no {INDEX_FILE}{hint}")
        self.tensors: dict[str, StoredTensor] = {}
        for name in files:
            path = self.model_dir / name
            if not path.is_file():
                raise CheckpointError(f"{index} names {name}, which is missing from {self.model_dir}")
            self.tensors.update(_read_header(path))
        self.keys_read: Counter[str] = Counter()  # how many times each tensor was read
        self._lock = threading.Lock()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    @property
    def files(self) -> list[Path]:
        """The checkpoint's files, in name order."""
        return sorted({stored.file for stored in self.tensors.values()})

    def stored(self, name: str) -> StoredTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"the checkpoint in {self.model_dir} has no tensor {name!r}") from None

    def read(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """One tensor, cast to ``dtype`` (floating tensors only; None: as stored) and placed on ``device``.

        On a GPU the tensor goes to the device in its stored dtype and is cast there, so the
        host holds one tensor at a time, never the part it belongs to.
        """
        stored = self.stored(name)
        device = torch.device(device)
        with self._lock:
            self.keys_read[name] += 1
        # A handle per tensor: a cast copy leaves nothing of the file mapped; an uncast tensor keeps its view.
        with safe_open(str(stored.file), framework="pt", device=str(device) if device.type == "cuda" else "cpu") as f:
            tensor = f.get_tensor(name)
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(device=device, dtype=dtype)
        return tensor.to(device)

    def digest(self, name: str, as_name: str | None = None) -> bytes:
        """sha256 over the name (``as_name`` when the model calls it otherwise), shape, stored dtype and
        bytes of one tensor, hashed from the file in chunks (or taken from the digest cache)."""
        stored = self.stored(name)
        label = as_name or name
        known = self._known_digests(stored.file)
        if label in known:
            return bytes.fromhex(known[label])
        value = self._hash(stored, label)
        with self._lock:
            known[label] = value.hex()
            self._unsaved.add(stored.file)
        return value

    def _hash(self, stored: StoredTensor, label: str) -> bytes:
        digest = hashlib.sha256(f"{label}|{list(stored.shape)}|{stored.dtype}|".encode())
        with open(stored.file, "rb") as handle:
            handle.seek(stored.start)
            left = stored.nbytes
            while left:
                chunk = handle.read(min(DIGEST_CHUNK, left))
                if not chunk:
                    raise CheckpointError(f"{stored.file} ends inside tensor {label!r}")
                digest.update(chunk)
                left -= len(chunk)
        return digest.digest()

    def _cache_file(self, file: Path) -> Path:
        return self.digest_cache / f"{hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:40]}.json"

    @staticmethod
    def _identity(file: Path) -> dict:
        status = file.stat()
        return {"file": str(file.resolve()), "size": status.st_size, "mtime_ns": status.st_mtime_ns}

    def _known_digests(self, file: Path) -> dict[str, str]:
        """The digests known for ``file``: from the cache when it describes the file as it is now."""
        with self._lock:
            if file not in self._file_digests:
                known: dict[str, str] = {}
                if self.digest_cache is not None:
                    try:
                        cached = json.loads(self._cache_file(file).read_text())
                        if {k: cached.get(k) for k in ("file", "size", "mtime_ns")} == self._identity(file):
                            known = {str(k): str(v) for k, v in cached["digests"].items()}
                    except (OSError, ValueError, KeyError, TypeError, AttributeError):
                        pass  # no cache yet, or one of another version of the file: hash again
                self._file_digests[file] = known
            return self._file_digests[file]

    def save_digests(self) -> None:
        """Write the digests computed since the last save to the cache (atomically; a failure is logged)."""
        if self.digest_cache is None:
            return
        with self._lock:
            files, self._unsaved = self._unsaved, set()
            for file in files:
                target = self._cache_file(file)
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    staging = target.with_suffix(f".{os.getpid()}.tmp")
                    staging.write_text(json.dumps({**self._identity(file), "digests": self._file_digests[file]}))
                    os.replace(staging, target)
                except OSError as exc:
                    log.warning("could not keep the tensor digests of %s in %s: %s", file, target.parent, exc)
