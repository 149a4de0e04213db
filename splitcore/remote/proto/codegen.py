"""Regenerate the Python code and .pyi stubs of trunk.proto (``make proto``).

The generated files are checked in; a test regenerates them into a temporary
directory and fails when the checked-in copies differ.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO_RELATIVE = Path("splitcore/remote/proto/trunk.proto")
GENERATED = ("trunk_pb2.py", "trunk_pb2.pyi", "trunk_pb2_grpc.py", "trunk_pb2_grpc.pyi")
PROJECT_ROOT = Path(__file__).resolve().parents[3]


def generate(root: Path) -> list[Path]:
    """Run protoc on ``root / splitcore/remote/proto/trunk.proto``; returns the generated files."""
    from grpc_tools import protoc

    mypy_grpc_plugin = shutil.which("protoc-gen-mypy_grpc", path=str(Path(sys.executable).parent))
    if mypy_grpc_plugin is None:
        raise RuntimeError("protoc-gen-mypy_grpc (from mypy-protobuf) is not installed next to this Python")
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"--python_out={root}",
        f"--pyi_out={root}",
        f"--grpc_python_out={root}",
        f"--plugin=protoc-gen-mypy_grpc={mypy_grpc_plugin}",
        f"--mypy_grpc_out={root}",
        str(root / PROTO_RELATIVE),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {root / PROTO_RELATIVE}")
    return [root / PROTO_RELATIVE.parent / name for name in GENERATED]


def generate_fresh_copy() -> dict[str, bytes]:
    """Generated files for the current trunk.proto, without touching the checkout."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / PROTO_RELATIVE.parent).mkdir(parents=True)
        shutil.copy(PROJECT_ROOT / PROTO_RELATIVE, root / PROTO_RELATIVE)
        return {path.name: path.read_bytes() for path in generate(root)}


if __name__ == "__main__":
    for path in generate(PROJECT_ROOT):
        print(path.relative_to(PROJECT_ROOT))
