"""GPU check: a trunk computing in bf16 on CUDA, against a CPU client and a CUDA client.

Needs no network and no model download: it builds a model with random weights from the
default model's architecture (``benchmarks/default_model_config.json``, the config.json of
SmolLM2-135M-Instruct) and saves it to a temporary directory. Then it

1. trains ``--steps`` steps in this process, unsplit, fp32 on the CPU: the reference losses;
2. starts ``python -m trunk_server --device DEVICE --dtype DTYPE`` on loopback and trains the
   same steps split, once with the client's Bottom and Top on the CPU and once on DEVICE;
   each run's losses must stay within ``--tolerance`` (relative) of the reference;
3. measures the trunk's throughput (tokens through Forward + Backward per second) with 1, 4
   and 8 sessions calling at once, and the device memory each added session takes.

It prints the figures and exits 1 when a loss check fails. With the defaults it takes a few
minutes on one GPU. Every path also runs on the CPU (``--device cpu``), as the tests do with a
tiny model's config.

    .venv/bin/python benchmarks/gpu_check.py [--device cuda] [--dtype bf16] [--steps 20]
        [--batch-size 4] [--seq-len 256] [--config benchmarks/default_model_config.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from splitcore import LoraSettings  # noqa: E402
from splitcore.data.examples import TokenizedExample  # noqa: E402
from splitcore.model.devices import DTYPES, resolve_device  # noqa: E402
from splitcore.model.split_spec import SplitSpec  # noqa: E402
from splitcore.privacy import ClientSecret  # noqa: E402
from splitcore.remote.client import TrunkClient  # noqa: E402
from splitcore.remote.process import start_trunk  # noqa: E402
from splitcore.training import LocalEngine, SplitEngine, TrainConfig  # noqa: E402
from splitcore.training.batches import TrainingData  # noqa: E402
from split_overhead import median_step_s, run  # noqa: E402 - the same training loop and timing

DEFAULT_CONFIG = Path(__file__).with_name("default_model_config.json")
LORA = LoraSettings(r=8, alpha=16, dropout=0.0)
MIB = 1 << 20
PAD_ID = 0  # the random data has no padding; ids from 3 on


def random_weight_model(config_path: Path, out_dir: Path) -> Path:
    """A model directory with the architecture of ``config_path`` and weights drawn from seed 0."""
    config = AutoConfig.for_model(**{k: v for k, v in json.loads(config_path.read_text()).items()
                                     if k not in ("architectures", "transformers_version")})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    return out_dir


def random_data(vocab_size: int, batch_size: int, seq_len: int) -> TrainingData:
    rng = random.Random(0)
    examples = []
    for _ in range(batch_size):
        ids = tuple(rng.randrange(3, vocab_size) for _ in range(seq_len))
        examples.append(TokenizedExample(input_ids=ids, labels=ids, full_length=seq_len))
    return TrainingData(train=tuple(examples), val=(), dropped=0)


def throughput(trunk, hidden_size: int, sessions: int, batch: int, seq: int, seconds: float) -> float:
    """Tokens per second through Forward + Backward + Step, with ``sessions`` clients calling at once."""
    clients = [TrunkClient(trunk.address, trunk.token) for _ in range(sessions)]
    for seed, client in enumerate(clients):
        client.open_session(LORA, seed=seed)
    tokens = [0] * sessions
    start = threading.Barrier(sessions + 1)
    errors: list[BaseException] = []

    def work(index: int) -> None:
        client = clients[index]
        hidden = torch.randn(batch, seq, hidden_size)
        mask = torch.ones(batch, seq, dtype=torch.long)
        start.wait()
        step = 0
        try:
            while time.monotonic() < deadline:
                step += 1
                client.forward(step, 0, hidden, mask)
                client.backward(step, 0, torch.randn_like(hidden), hidden, mask)
                client.step(step, 1e-4)
                tokens[index] += batch * seq
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(sessions)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + seconds
    started = time.monotonic()
    start.wait()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    for client in clients:
        client.close_session_quietly()
        client.close()
    if errors:
        raise errors[0]
    return sum(tokens) / elapsed


def memory_per_session(trunk, hidden_size: int, sessions: int, batch: int, seq: int) -> list[int]:
    """The trunk's reported session memory after each added session (one step each), in bytes."""
    clients, used = [], []
    try:
        for seed in range(sessions):
            client = TrunkClient(trunk.address, trunk.token)
            clients.append(client)
            client.open_session(LORA, seed=seed)
            hidden, mask = torch.randn(batch, seq, hidden_size), torch.ones(batch, seq, dtype=torch.long)
            client.forward(1, 0, hidden, mask)
            client.backward(1, 0, torch.randn_like(hidden), hidden, mask)
            client.step(1, 1e-4)
            used.append(client.info().memory_sessions_bytes)
    finally:
        for client in clients:
            client.close_session_quietly()
            client.close()
    return used


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="where the trunk (and the second client) compute")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="the trunk's compute dtype")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="a model's config.json")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--bottom-layers", type=int, default=2)
    parser.add_argument("--top-layers", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="largest relative difference of a step's loss from the fp32 CPU reference")
    parser.add_argument("--throughput-s", type=float, default=10.0, help="seconds per concurrency level")
    parser.add_argument("--sessions", default="1,4,8", help="concurrency levels of the throughput test")
    args = parser.parse_args()
    device = resolve_device(args.device)
    levels = [int(n) for n in args.sessions.split(",")]
    secret = ClientSecret.generate()  # one key for every run: they all start from the same weights
    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    print(f"device {device} ({where}), trunk dtype {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = random_weight_model(args.config, Path(tmp) / "model")
        model_config = AutoConfig.from_pretrained(model_dir)
        data = random_data(model_config.vocab_size, args.batch_size, args.seq_len)
        config = TrainConfig(lora=LORA, max_steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                             learning_rate=2e-4)
        spec = SplitSpec(model_config.num_hidden_layers, args.bottom_layers, args.top_layers)
        print(f"random-weight {model_config.model_type} model: {model_config.num_hidden_layers} layers, hidden "
              f"{model_config.hidden_size}; {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, "
              f"split {args.bottom_layers}/{args.top_layers}", flush=True)

        reference = run(LocalEngine(AutoModelForCausalLM.from_pretrained(model_dir), config, spec, secret=secret),
                        config, data, PAD_ID)
        print(f"reference (unsplit, fp32, cpu): median step {median_step_s(reference):.3f} s, "
              f"final loss {reference[-1].loss:.5f}", flush=True)

        failed = False
        trunk = start_trunk(model_dir, Path(tmp), "--device", device, "--dtype", args.dtype,
                            "--max-sessions", str(max(levels + [8])), n_bottom=args.bottom_layers,
                            n_top=args.top_layers)
        try:
            with TrunkClient(trunk.address, trunk.token) as probe:
                info = probe.info()
            print(f"trunk: {info.device}, {info.dtype}, base weights {info.memory_base_bytes / MIB:.1f} MiB of "
                  f"{info.memory_total_bytes / MIB:.0f} MiB", flush=True)
            for client_device in dict.fromkeys(("cpu", device)):
                with TrunkClient(trunk.address, trunk.token) as client:
                    model = AutoModelForCausalLM.from_pretrained(model_dir)
                    steps = run(SplitEngine(model, config, client, secret=secret, device=client_device),
                                config, data, PAD_ID)
                drift = max(abs(a.loss - b.loss) / b.loss for a, b in zip(steps, reference, strict=True))
                verdict = "ok" if drift <= args.tolerance else "FAILED"
                failed |= drift > args.tolerance
                print(f"split, client on {client_device}: median step {median_step_s(steps):.3f} s, final loss "
                      f"{steps[-1].loss:.5f}, largest relative loss difference from the reference {drift:.2e} "
                      f"(tolerance {args.tolerance:g}): {verdict}", flush=True)
            for sessions in levels:
                rate = throughput(trunk, model_config.hidden_size, sessions, args.batch_size, args.seq_len,
                                  args.throughput_s)
                print(f"trunk throughput with {sessions} session(s): {rate:,.0f} tokens/s "
                      "(Forward + Backward + Step)", flush=True)
            used = memory_per_session(trunk, model_config.hidden_size, max(levels), args.batch_size, args.seq_len)
            added = [b - a for a, b in zip([0] + used, used)]
            print(f"trunk memory of the sessions after 1..{len(used)} sessions: "
                  + ", ".join(f"{u / MIB:.1f}" for u in used) + " MiB; "
                  f"each added session {statistics.median(added) / MIB:.1f} MiB (median)", flush=True)
        finally:
            trunk.stop()
    print("GPU check " + ("FAILED" if failed else "passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
