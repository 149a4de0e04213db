"""Start a trunk server as a child process and learn its address (for tools, tests, benchmarks).

It runs ``python -m trunk_server`` as a subprocess and never imports it, so the web
application can start a local trunk without depending on the server's code.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(r"listening on ([\w.\[\]:-]+:\d+) ")
_METRICS = re.compile(r"metrics on (http://\S+/metrics)")


def stop_process(process: subprocess.Popen, timeout: float = 30) -> int:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; returns the exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@dataclass
class TrunkProcess:
    process: subprocess.Popen
    address: str
    token: str
    log_path: Path
    metrics_url: str | None = None  # with --metrics-port: where its Prometheus metrics are
    startup_line: str = ""  # what it printed once listening

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 30) -> int:
        return stop_process(self.process, timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_trunk(model_dir: str | os.PathLike, log_dir: str | os.PathLike, *extra: str, n_bottom: int = 2,
                n_top: int = 2, token: str | None = None, startup_timeout_s: float = 180,
                layers: str | None = None) -> TrunkProcess:
    """``python -m trunk_server`` on a free loopback port; its stderr goes to a log file in ``log_dir``.

    ``layers`` ("A-B"): serve exactly those blocks (``--layers``) instead of the cut ``n_bottom``/``n_top``.
    """
    token = token or secrets.token_hex(24)
    log_path = Path(log_dir) / f"trunk-{secrets.token_hex(4)}.log"
    env = {**os.environ, "TRUNK_TOKEN": token}
    served = ["--layers", layers] if layers else ["--bottom-layers", str(n_bottom), "--top-layers", str(n_top)]
    command = [sys.executable, "-m", "trunk_server", "--model", str(model_dir), *served, "--port", "0", *extra]
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, text=True, env=env,
                                   cwd=PROJECT_ROOT)
    deadline = time.monotonic() + startup_timeout_s
    line = ""
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith("trunk server listening on") or process.poll() is not None:
            break
    match = _LISTENING.search(line)
    if not match:
        process.kill()
        process.wait()
        raise RuntimeError(f"trunk server did not start: {line!r}\n{log_path.read_text()[-3000:]}")
    metrics = _METRICS.search(line)
    return TrunkProcess(process=process, address=match.group(1), token=token, log_path=log_path,
                        metrics_url=metrics.group(1) if metrics else None, startup_line=line.strip())
