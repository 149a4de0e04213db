"""What splitting costs: step time split vs local, bytes on the wire, encoding drift, trunk memory.

Runs the default model (SmolLM2-135M-Instruct) with a batch of 8 x 256 tokens by default:
the local baseline in this process, then split runs against a trunk server in its own
process on loopback, one per wire encoding. Prints

- median local and split (fp32) step times and their ratio (target: <= 1.02);
- wire bytes per optimizer step for each encoding;
- how far the bf16 / fp16 / int8 losses drift from the fp32 losses: at the last step and the
  largest over the run, relative and absolute (max |Δloss|);
- a trunk computing in bf16 (``--dtype bf16``; fp32 on the wire): its step time and how far its
  losses drift from the fp32 trunk's;
- the trunk's resident memory with 1 and with 8 open training sessions.

    .venv/bin/python benchmarks/split_overhead.py [--steps 20] [--batch-size 8] [--seq-len 256]
        [--encodings fp32,bf16] [--trunk-device cpu|cuda] [--skip-memory] [--drift-only] [--tiny]
        [--overhead-only --rounds 3]

``--overhead-only --rounds N`` measures just split against local (fp32) in N rounds; in each, a
local and a split run train one step at a time in turn, so a change in the machine's speed falls
on both; it prints each round's medians and the median of the rounds' ratios. ``--drift-only`` runs
just the split runs and prints the encoding table (no local baseline, bf16 trunk or memory); ``--tiny`` uses a tiny Llama written to a temporary folder, for a quick table:

    .venv/bin/python benchmarks/split_overhead.py --tiny --drift-only --batch-size 4 --seq-len 32
"""

from __future__ import annotations

import argparse
import atexit
import random
import shutil
import statistics
import sys
import tempfile
import threading
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from splitcore import LoraSettings  # noqa: E402
from splitcore.data.examples import TokenizedExample  # noqa: E402
from splitcore.model import default_model  # noqa: E402
from splitcore.model.split_spec import SplitSpec  # noqa: E402
from splitcore.model.tiny_models import TinyModelSpec, write_tiny_model  # noqa: E402
from splitcore.privacy import ClientSecret  # noqa: E402
from splitcore.remote.client import TrunkClient  # noqa: E402
from splitcore.remote.process import start_trunk  # noqa: E402
from splitcore.remote.trunk import spec_from_info  # noqa: E402
from splitcore.remote.wire import FLOAT_ENCODINGS  # noqa: E402
from splitcore.training import LocalEngine, SplitEngine, SplitTrainer, StepMetrics, TrainConfig  # noqa: E402
from splitcore.training.batches import TrainingData  # noqa: E402

WORDS = ("split learning keeps every token of the data with its owner while a remote trunk computes the middle "
         "layers of the model and returns hidden states and gradients").split()


def synthetic_data(tokenizer, batch_size: int, seq_len: int, seed: int = 0) -> TrainingData:
    """``batch_size`` examples of exactly ``seq_len`` tokens: one full batch per micro-batch."""
    rng = random.Random(seed)
    examples = []
    for _ in range(batch_size):
        ids: list[int] = []
        while len(ids) < seq_len:
            ids += tokenizer(" ".join(rng.choices(WORDS, k=64)), add_special_tokens=False).input_ids
        ids = ids[:seq_len]
        examples.append(TokenizedExample(input_ids=tuple(ids), labels=tuple(ids), full_length=seq_len))
    return TrainingData(train=tuple(examples), val=(), dropped=0)


def run(engine, config, data, pad_id) -> list[StepMetrics]:
    steps: list[StepMetrics] = []
    SplitTrainer(engine, config, data, pad_id, callbacks=[lambda e: steps.append(e) if isinstance(
        e, StepMetrics) else None]).run()
    engine.close()
    return steps


def median_step_s(steps: list[StepMetrics]) -> float:
    durations = [b.elapsed_s - a.elapsed_s for a, b in zip(steps, steps[1:])]  # the first step warms up
    return statistics.median(durations) if durations else steps[0].elapsed_s


def run_in_turns(runs: list[tuple[object, TrainConfig]], data, pad_id) -> list[list[StepMetrics]]:
    """Train each (engine, config) of ``runs`` one step at a time in turn, so whatever changes the machine's
    speed (its other work, a noisy neighbour) falls on every run alike; returns each run's steps.

    Each run trains in a thread of its own that waits for its turn after every step (only the steps are
    timed: a step's duration is measured inside the trainer, not the wait for the turn)."""
    turns = [threading.Semaphore(0) for _ in runs]
    steps: list[list[StepMetrics]] = [[] for _ in runs]
    errors: list[BaseException] = []

    def train(index: int, engine, config: TrainConfig) -> None:
        def on_event(event) -> None:
            if isinstance(event, StepMetrics):
                steps[index].append(event)
                turns[(index + 1) % len(runs)].release()
                if event.step < event.total_steps:
                    turns[index].acquire()

        turns[index].acquire()
        try:
            SplitTrainer(engine, config, data, pad_id, callbacks=[on_event]).run()
        except BaseException as error:  # reported by the caller; the others must not wait for this run's turn
            errors.append(error)
            for turn in turns:
                turn.release(len(runs) * config.max_steps)
        finally:
            engine.close()

    threads = [threading.Thread(target=train, args=(index, engine, config), name=f"run-{index}")
               for index, (engine, config) in enumerate(runs)]
    for thread in threads:
        thread.start()
    turns[0].release()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return steps


def overhead_rounds(model_dir: Path, trunk, config: TrainConfig, spec: SplitSpec, data, pad_id, secret,
                    rounds: int) -> list[tuple[float, float]]:
    """(local, split) median step seconds of ``rounds`` rounds with the same data and key, each round a local
    and a split run stepping in turns."""
    results = []
    for number in range(1, rounds + 1):
        with TrunkClient(trunk.address, trunk.token) as client:
            local, split = run_in_turns([
                (LocalEngine(AutoModelForCausalLM.from_pretrained(model_dir), config, spec, secret=secret), config),
                (SplitEngine(AutoModelForCausalLM.from_pretrained(model_dir), config, client, secret=secret), config),
            ], data, pad_id)
        results.append((median_step_s(local), median_step_s(split)))
        print(f"round {number}: local {results[-1][0]:.3f} s, split {results[-1][1]:.3f} s, "
              f"split/local = {results[-1][1] / results[-1][0]:.3f}", flush=True)
    return results


def print_encoding_table(split: dict[str, list[StepMetrics]]) -> None:
    """Per encoding: wire bytes per step (and vs fp32), final loss, drift from the fp32 run."""
    fp32 = split["fp32"]
    fp32_bytes = statistics.median(s.wire_bytes for s in fp32)
    print(f"{'encoding':>8} {'MiB/step':>9} {'vs fp32':>8} {'final loss':>11} {'drift@last':>11} {'max drift':>10} "
          f"{'max |Δloss|':>12}")
    for encoding, steps in split.items():
        per_step = statistics.median(s.wire_bytes for s in steps)
        drift_last = abs(steps[-1].loss - fp32[-1].loss) / fp32[-1].loss
        drift_max = max(abs(a.loss - b.loss) / b.loss for a, b in zip(steps, fp32))
        delta_max = max(abs(a.loss - b.loss) for a, b in zip(steps, fp32))
        print(f"{encoding:>8} {per_step / 2**20:9.2f} {per_step / fp32_bytes:8.3f} "
              f"{steps[-1].loss:11.5f} {drift_last:11.2e} {drift_max:10.2e} {delta_max:12.2e}")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc")


def trunk_memory(model_dir: Path, log_dir: Path, lora: LoraSettings, sessions: int) -> float:
    """Trunk RSS after opening ``sessions`` training sessions and running one step in each."""
    trunk = start_trunk(model_dir, log_dir, "--max-sessions", str(max(sessions, 1)))
    clients = []
    try:
        for seed in range(sessions):
            client = TrunkClient(trunk.address, trunk.token)
            clients.append(client)
            client.open_session(lora, seed=seed)
            info = client.info()
            hidden = torch.randn(1, 16, info.hidden_size)
            mask = torch.ones(1, 16, dtype=torch.long)
            client.forward(1, 0, hidden, mask)
            client.backward(1, 0, torch.randn_like(hidden), hidden, mask)
            client.step(1, 1e-4)
        return rss_mib(trunk.pid)
    finally:
        for client in clients:
            client.close_session_quietly()
            client.close()
        trunk.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model directory (default: the prepared default model)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--bottom-layers", type=int, default=2)
    parser.add_argument("--top-layers", type=int, default=2)
    parser.add_argument("--encodings", default=",".join(FLOAT_ENCODINGS),
                        help="wire encodings to run (comma-separated; fp32 always runs)")
    parser.add_argument("--trunk-device", default="cpu", help="where the trunks compute (cpu, cuda, cuda:N)")
    parser.add_argument("--skip-memory", action="store_true", help="skip the resident-memory measurement")
    parser.add_argument("--drift-only", action="store_true",
                        help="only the split runs and the encoding table (no local run, bf16 trunk or memory)")
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama written to a temporary folder")
    parser.add_argument("--overhead-only", action="store_true",
                        help="only split against local (fp32), in --rounds rounds of runs stepping in turn")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --overhead-only")
    args = parser.parse_args()
    encodings = ["fp32"] + [e for e in args.encodings.split(",") if e and e != "fp32"]
    if args.tiny:
        tiny_dir = Path(tempfile.mkdtemp(prefix="tiny-llama-"))
        atexit.register(shutil.rmtree, tiny_dir, ignore_errors=True)
        model_dir = write_tiny_model(tiny_dir, TinyModelSpec(arch="llama"))
    else:
        model_dir = args.model or default_model.prepare_default_model()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = synthetic_data(tokenizer, args.batch_size, args.seq_len)
    lora = LoraSettings(r=8, alpha=16, dropout=0.0)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    print(f"model {model_dir.name}, batch {args.batch_size} x {args.seq_len}, {args.steps} steps, "
          f"split {args.bottom_layers}/{args.top_layers}, {torch.get_num_threads()} torch threads", flush=True)

    def config(encoding: str) -> TrainConfig:
        return TrainConfig(lora=lora, max_steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                           learning_rate=2e-4, wire_encoding=encoding)

    # One key for every run: the split runs' trunk LoRA starts as the local run's does.
    secret = ClientSecret.generate()
    if args.overhead_only:
        spec = SplitSpec(AutoConfig.from_pretrained(model_dir).num_hidden_layers, args.bottom_layers, args.top_layers)
        with tempfile.TemporaryDirectory() as log_dir:
            trunk = start_trunk(model_dir, Path(log_dir), "--device", args.trunk_device, n_bottom=args.bottom_layers,
                                n_top=args.top_layers)
            try:
                rounds = overhead_rounds(model_dir, trunk, config("fp32"), spec, data, pad_id, secret, args.rounds)
            finally:
                trunk.stop()
        ratio = statistics.median(split_s / local_s for local_s, split_s in rounds)
        print(f"\nsplit/local over {len(rounds)} interleaved rounds: median {ratio:.3f} (rounds: "
              f"{', '.join(f'{split_s / local_s:.3f}' for local_s, split_s in rounds)})")
        return 0
    if not args.drift_only:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        spec = SplitSpec(model.config.num_hidden_layers, args.bottom_layers, args.top_layers)
        local = run(LocalEngine(model, config("fp32"), spec, secret=secret), config("fp32"),
                    data, pad_id)
        print(f"local: median step {median_step_s(local):.3f} s, final loss {local[-1].loss:.5f}", flush=True)

    split: dict[str, list[StepMetrics]] = {}
    with tempfile.TemporaryDirectory() as log_dir:
        trunk = start_trunk(model_dir, Path(log_dir), "--device", args.trunk_device, n_bottom=args.bottom_layers,
                            n_top=args.top_layers)
        try:
            for encoding in encodings:
                client = TrunkClient(trunk.address, trunk.token, wire_encoding=encoding)
                spec = spec_from_info(client.info())
                assert (spec.n_bottom, spec.n_top) == (args.bottom_layers, args.top_layers)
                model = AutoModelForCausalLM.from_pretrained(model_dir)
                split[encoding] = run(SplitEngine(model, config(encoding), client, secret=secret), config(encoding),
                                      data, pad_id)
                client.close()
                print(f"split {encoding}: median step {median_step_s(split[encoding]):.3f} s, "
                      f"final loss {split[encoding][-1].loss:.5f}", flush=True)
        finally:
            trunk.stop()
        if args.drift_only:
            print()
            print_encoding_table(split)
            return 0
        bf16_trunk = start_trunk(model_dir, Path(log_dir), "--device", args.trunk_device, "--dtype", "bf16",
                                 n_bottom=args.bottom_layers, n_top=args.top_layers)
        try:
            with TrunkClient(bf16_trunk.address, bf16_trunk.token) as client:
                model = AutoModelForCausalLM.from_pretrained(model_dir)
                bf16_compute = run(SplitEngine(model, config("fp32"), client, secret=secret), config("fp32"), data,
                                   pad_id)
        finally:
            bf16_trunk.stop()
        print(f"split on a bf16 trunk: median step {median_step_s(bf16_compute):.3f} s, "
              f"final loss {bf16_compute[-1].loss:.5f}", flush=True)
        if not args.skip_memory:
            one = trunk_memory(model_dir, Path(log_dir), lora, 1)
            eight = trunk_memory(model_dir, Path(log_dir), lora, 8)

    local_s, split_s = median_step_s(local), median_step_s(split["fp32"])
    print()
    print(f"step time: local {local_s:.3f} s, split (fp32) {split_s:.3f} s, split/local = {split_s / local_s:.3f}")
    fp32 = split["fp32"]
    print(f"fp32 split vs local, max relative loss difference: "
          f"{max(abs(a.loss - b.loss) / b.loss for a, b in zip(fp32, local)):.2e}")
    print_encoding_table(split)
    fp32_trunk_s, bf16_trunk_s = median_step_s(fp32), median_step_s(bf16_compute)
    print(f"trunk compute dtype ({args.trunk_device}): bf16 step {bf16_trunk_s:.3f} s vs fp32 {fp32_trunk_s:.3f} s "
          f"(bf16/fp32 = {bf16_trunk_s / fp32_trunk_s:.3f}); after {len(bf16_compute)} steps the final loss is "
          f"{bf16_compute[-1].loss:.5f} vs {fp32[-1].loss:.5f} (drift {abs(bf16_compute[-1].loss - fp32[-1].loss):.2e}, "
          f"{abs(bf16_compute[-1].loss - fp32[-1].loss) / fp32[-1].loss:.2e} relative; largest over the run "
          f"{max(abs(a.loss - b.loss) / b.loss for a, b in zip(bf16_compute, fp32)):.2e})")
    if not args.skip_memory:
        print(f"trunk resident memory: {one:.0f} MiB with 1 session, {eight:.0f} MiB with 8 sessions "
              f"(+{(eight - one) / 7:.1f} MiB per extra session)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
