"""Start a real trunk server process on a free loopback port, and stop it."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class TrunkProcess:
    process: subprocess.Popen
    address: str
    token: str
    log_path: Path

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_trunk(model_dir: Path, log_dir: Path, *extra: str, n_bottom: int = 2, n_top: int = 2,
                token: str | None = None) -> TrunkProcess:
    token = token or secrets.token_hex(24)
    log_path = log_dir / f"trunk-{secrets.token_hex(4)}.log"
    env = {**os.environ, "TRUNK_TOKEN": token}
    command = [sys.executable, "-m", "trunk_server", "--model", str(model_dir), "--bottom-layers", str(n_bottom),
               "--top-layers", str(n_top), "--port", "0", *extra]
    log_file = open(log_path, "w")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, text=True, env=env,
                               cwd=PROJECT_ROOT)
    deadline = time.monotonic() + 180
    line = ""
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith("trunk server listening on") or process.poll() is not None:
            break
    match = re.search(r"listening on ([\d.]+:\d+) ", line)
    if not match:
        process.kill()
        raise RuntimeError(f"trunk server did not start: {line!r}\n{log_path.read_text()[-3000:]}")
    return TrunkProcess(process=process, address=match.group(1), token=token, log_path=log_path)
