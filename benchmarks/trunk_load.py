"""The trunk under many clients: N training clients at once on one trunk server, against one alone.

Each client opens its own training session (trunk LoRA r 8) and runs ``--steps`` optimizer steps
of one micro-batch each (Forward, Backward, Step) with random hidden states of ``--rows`` x
``--positions``, as fast as the trunk answers. The clients are threads of this process, started
together once every session is open (waiting on the network, they leave the CPU to the trunk).
Prints, for one client alone and for N at once:

- the p50 and p95 latency of each call (Forward, Backward, Step) as the client sees it;
- the aggregate tokens per second (rows x positions of every step of every client, over the
  wall time), and N clients' rate against one client's;
- for N clients, each session's progress when the first one finished: the slowest against the
  fastest (the goal: the fastest at most 1.5 times as far as the slowest, since sessions take the
  model in turn), and how many calls gRPC turned away at the server's cap on concurrent calls
  (the clients wait those out).

By default the model has the default model's shape (``benchmarks/default_model_config.json``,
SmolLM2-135M-Instruct) with random weights written to a temporary folder (no download);
``--config`` takes any config.json, ``--model`` a model directory, ``--tiny`` a tiny Llama.
Exits with 1 when a run failed or the slowest session fell further behind than the goal.

    .venv/bin/python benchmarks/trunk_load.py [--clients 8] [--steps 10] [--rows 4] [--positions 128]
        [--config benchmarks/default_model_config.json | --model DIR | --tiny]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from splitcore import LoraSettings  # noqa: E402
from splitcore.model.tiny_models import TinyModelSpec, write_tiny_model  # noqa: E402
from splitcore.remote.client import TrunkClient  # noqa: E402
from splitcore.remote.process import start_trunk  # noqa: E402

DEFAULT_CONFIG = Path(__file__).with_name("default_model_config.json")
LORA = LoraSettings(r=8, alpha=16, dropout=0.0)
CALLS = ("Forward", "Backward", "Step")
FAIRNESS_GOAL = 1.5


@dataclass
class LoadRun:
    """What ``run_clients`` measured."""

    clients: int
    steps: int
    tokens_per_step: int
    wall_s: float = 0.0
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    finished_at: dict[int, list[float]] = field(default_factory=dict)  # client -> time each step ended
    errors: list[str] = field(default_factory=list)
    overload_retries: int = 0

    @property
    def completed(self) -> int:
        return sum(len(times) == self.steps for times in self.finished_at.values())

    @property
    def tokens_per_s(self) -> float:
        done = sum(len(times) for times in self.finished_at.values())
        return done * self.tokens_per_step / self.wall_s if self.wall_s else 0.0

    def progress_when_first_finished(self) -> list[int]:
        """Steps each client had finished when the first client finished its last step."""
        first = min(times[-1] for times in self.finished_at.values() if len(times) == self.steps)
        return [sum(t <= first for t in times) for times in self.finished_at.values()]

    def fairness(self) -> float:
        """The fastest session's progress over the slowest's when the first one finished (1: in step)."""
        progress = self.progress_when_first_finished()
        return max(progress) / max(1, min(progress))

    def percentile(self, call: str, q: float) -> float:
        values = sorted(self.latencies[call])
        return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def run_clients(address: str, token: str, hidden_size: int, clients: int, steps: int, rows: int,
                positions: int, timeout_s: float = 600.0) -> LoadRun:
    """``clients`` sessions at once on one trunk, ``steps`` steps each; every session is open before
    any of them starts."""
    run = LoadRun(clients=clients, steps=steps, tokens_per_step=rows * positions)
    lock = threading.Lock()
    opened = threading.Barrier(clients + 1)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, positions, hidden_size, generator=generator)
    mask = torch.ones(rows, positions, dtype=torch.long)
    grad = torch.randn(rows, positions, hidden_size, generator=generator) * 1e-3

    def timed(call: str, function, *args):
        started = time.perf_counter()
        result = function(*args)
        with lock:
            run.latencies[call].append(time.perf_counter() - started)
        return result

    def client_run(index: int) -> None:
        times: list[float] = []
        run.finished_at[index] = times
        try:
            with TrunkClient(address, token, timeout_s=timeout_s) as client:
                try:
                    client.open_session(LORA, seed=index)
                finally:
                    opened.wait()
                for step in range(1, steps + 1):
                    timed("Forward", client.forward, step, 0, hidden, mask)
                    timed("Backward", client.backward, step, 0, grad, hidden, mask)
                    timed("Step", client.step, step, 1e-4)
                    times.append(time.perf_counter())
                with lock:
                    run.overload_retries += client.overload_retries
        except Exception as error:  # noqa: BLE001 - every failure is reported
            with lock:
                run.errors.append(f"client {index}: {error}")

    threads = [threading.Thread(target=client_run, args=(index,), name=f"load-client-{index}")
               for index in range(clients)]
    for thread in threads:
        thread.start()
    opened.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    run.wall_s = time.perf_counter() - started
    return run


def report(alone: LoadRun, together: LoadRun) -> str:
    lines = ["| clients | " + " | ".join(f"{call} p50 / p95" for call in CALLS) + " | tokens/s | vs one alone |",
             "|" + " --- |" * (len(CALLS) + 3)]
    for run in (alone, together):
        cells = [f"{run.percentile(call, 0.5) * 1000:.0f} / {run.percentile(call, 0.95) * 1000:.0f} ms"
                 for call in CALLS]
        lines.append(f"| {run.clients} | " + " | ".join(cells)
                     + f" | {run.tokens_per_s:,.0f} | {run.tokens_per_s / alone.tokens_per_s:.2f}x |")
    progress = together.progress_when_first_finished()
    lines += ["", f"{together.completed} of {together.clients} runs finished; when the first finished, the sessions "
              f"had done {sorted(progress)} of {together.steps} steps: the fastest {together.fairness():.2f}x as "
              f"far as the slowest (goal: at most {FAIRNESS_GOAL}x); {together.overload_retries} calls turned "
              "away at the cap on concurrent calls and retried"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--positions", type=int, default=128)
    parser.add_argument("--trunk-device", default="cpu")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="a config.json (random weights)")
    source.add_argument("--model", type=Path, help="a model directory")
    source.add_argument("--tiny", action="store_true", help="a tiny Llama written to a temporary folder")
    args = parser.parse_args()
    if args.clients < 2 or args.steps < 1:
        parser.error("--clients must be at least 2 and --steps at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        if args.model:
            model_dir = args.model
        elif args.tiny:
            model_dir = write_tiny_model(tmp_dir / "model", TinyModelSpec(arch="llama"))
        else:
            sys.path.insert(0, str(Path(__file__).parent))
            from gpu_check import random_weight_model
            model_dir = random_weight_model(args.config, tmp_dir / "model")
        trunk = start_trunk(model_dir, tmp_dir, "--max-sessions", str(args.clients), "--device", args.trunk_device)
        try:
            with TrunkClient(trunk.address, trunk.token) as probe:
                hidden_size = probe.info().hidden_size
            shape = dict(hidden_size=hidden_size, steps=args.steps, rows=args.rows, positions=args.positions)
            alone = run_clients(trunk.address, trunk.token, clients=1, **shape)
            together = run_clients(trunk.address, trunk.token, clients=args.clients, **shape)
        finally:
            trunk.stop()
    for failure in alone.errors + together.errors:
        print(failure, file=sys.stderr)
    if alone.errors or together.completed < args.clients:
        return 1
    print(f"{model_dir.name if args.model else 'tiny Llama' if args.tiny else args.config.name}: "
          f"{args.rows} x {args.positions} tokens per step, {args.steps} steps per client, trunk LoRA r {LORA.r}")
    print(report(alone, together))
    print(f"load average over the last minute: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0 if together.fairness() <= FAIRNESS_GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
