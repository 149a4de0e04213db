"""What a chain of trunks costs: one trunk against chains of 2 and 3 links, on loopback.

The same model, data, key and settings run split against one trunk server and against chains of
trunk servers (``python -m trunk_server --layers A-B``, one process per link, the cut's trunk
blocks shared out evenly in block order). Prints, per chain length:

- the median step time (the first step of each run warms up and is left out), the lowest and
  highest of the runs' own medians (the noise of the machine), and its ratio to the single trunk's: each extra link adds a Forward and a Backward hop per micro-batch (goal: at
  most 5% per extra link on loopback);
- the bytes on the wire per optimizer step, per link (median): every link receives and returns
  hidden states of the same shape, so each link carries what a single trunk carries;
- the largest loss difference from the single trunk's run over all steps (every link's LoRA starts
  from the run's trunk seed, so a chain computes what one trunk computes: 0 expected).

Every run is repeated ``--rounds`` times, in the order 1, 2, 3 links and back (3, 2, 1), so a slow
drift of the machine's speed falls on every chain length alike; the step times of all rounds are
pooled. The trunks of every chain length start once, before the first run, and stay up.

By default the model has the default model's shape (``benchmarks/default_model_config.json``,
SmolLM2-135M-Instruct: 30 blocks, hidden 576) with random weights written to a temporary folder,
as ``gpu_check.py`` builds it (no download); ``--config`` takes any config.json, ``--model`` a
model directory, ``--tiny`` a tiny Llama (6 blocks) for a quick check.

    .venv/bin/python benchmarks/chain_overhead.py [--steps 10] [--rounds 2] [--links 1,2,3]
        [--batch-size 4] [--seq-len 128] [--bottom-layers 2] [--top-layers 2] [--trunk-device cpu]
        [--config benchmarks/default_model_config.json | --model DIR | --tiny]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as transformers_logging

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from splitcore import LoraSettings  # noqa: E402
from splitcore.model.tiny_models import TinyModelSpec, write_tiny_model  # noqa: E402
from splitcore.privacy import ClientSecret  # noqa: E402
from splitcore.remote.client import TrunkClient  # noqa: E402
from splitcore.remote.process import start_trunk  # noqa: E402
from splitcore.training import SplitEngine, SplitTrainer, StepMetrics, TrainConfig  # noqa: E402
from gpu_check import DEFAULT_CONFIG, PAD_ID, random_data, random_weight_model  # noqa: E402 - the same model

LORA = LoraSettings(r=8, alpha=16, dropout=0.0)
MIB = 1 << 20
GOAL_PER_EXTRA_LINK = 0.05


def link_ranges(first: int, stop: int, links: int) -> list[range]:
    """Blocks ``first``..``stop - 1`` shared out in block order over ``links`` contiguous ranges, as evenly
    as they divide (the earlier links take the remainder)."""
    blocks = stop - first
    if not 1 <= links <= blocks:
        raise ValueError(f"cannot share {blocks} trunk blocks out over {links} links: each link needs at least one")
    size, extra = divmod(blocks, links)
    ranges, start = [], first
    for index in range(links):
        end = start + size + (1 if index < extra else 0)
        ranges.append(range(start, end))
        start = end
    return ranges


def blocks_text(layers: range) -> str:
    return f"{layers.start}-{layers.stop - 1}"


@dataclass
class ChainRuns:
    """The trunk processes of one chain length and what its runs measured."""

    layers: list[range]
    trunks: list = field(default_factory=list)
    durations: list[float] = field(default_factory=list)  # seconds per step, warm-up steps left out
    run_medians: list[float] = field(default_factory=list)  # each run's median step time
    link_bytes: list[list[int]] = field(default_factory=list)  # per step: bytes to and from each link
    losses: list[list[float]] = field(default_factory=list)  # per run: the loss of each step

    @property
    def links(self) -> int:
        return len(self.layers)

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.durations)

    def bytes_per_step(self) -> list[float]:
        """Median bytes per optimizer step to and from each link."""
        return [statistics.median(step[i] for step in self.link_bytes) for i in range(self.links)]

    def label(self) -> str:
        return "1 trunk" if self.links == 1 else f"chain of {self.links}"


def train_once(chain: ChainRuns, model_dir: Path, config: TrainConfig, data, secret: ClientSecret) -> None:
    """One split run against ``chain``'s trunks; appends its step times, bytes per link and losses."""
    clients = [TrunkClient(trunk.address, trunk.token) for trunk in chain.trunks]
    try:
        engine = SplitEngine(AutoModelForCausalLM.from_pretrained(model_dir), config, clients, secret=secret)
        if [link.layers for link in engine.links] != chain.layers:
            raise RuntimeError(f"the engine planned {[link.layers for link in engine.links]}, not {chain.layers}")
        steps: list[StepMetrics] = []
        readings = [engine.wire_bytes_by_link()]

        def on_event(event) -> None:
            if isinstance(event, StepMetrics):
                steps.append(event)
                readings.append(engine.wire_bytes_by_link())

        try:
            SplitTrainer(engine, config, data, PAD_ID, callbacks=[on_event]).run()
        finally:
            engine.close()
    finally:
        for client in clients:
            client.close()
    elapsed = [s.elapsed_s for s in steps]
    durations = [b - a for a, b in zip(elapsed, elapsed[1:])]  # the first step warms up
    chain.durations += durations
    chain.run_medians.append(statistics.median(durations))
    chain.link_bytes += [[b - a for a, b in zip(before, after)] for before, after in zip(readings, readings[1:])]
    chain.losses.append([s.loss for s in steps])


def print_table(chains: list[ChainRuns]) -> None:
    single = chains[0]
    reference = single.losses[0]
    print(f"{'trunk':<11} {'blocks per link':<22} {'median step':>11} {'runs':>13} {'vs 1 trunk':>10} "
          f"{'per extra link':>14} {'MiB/step per link':<24} {'max |Δloss|':>11}")
    for chain in chains:
        ratio = chain.median_step_s / single.median_step_s
        per_link = f"{(ratio - 1) / (chain.links - 1):+.1%}" if chain.links > 1 else "-"
        delta = max(abs(a - b) for run in chain.losses for a, b in zip(run, reference, strict=True))
        mib = ", ".join(f"{b / MIB:.2f}" for b in chain.bytes_per_step())
        runs = f"{min(chain.run_medians):.3f}-{max(chain.run_medians):.3f}s"
        print(f"{chain.label():<11} {', '.join(blocks_text(r) for r in chain.layers):<22} "
              f"{chain.median_step_s:>10.3f}s {runs:>13} {ratio:>10.3f} {per_link:>14} {mib:<24} {delta:>11.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="a config.json: random weights of that shape (default: the default model's shape)")
    source.add_argument("--model", type=Path, help="a model directory instead of random weights")
    source.add_argument("--tiny", action="store_true", help="a tiny Llama (6 blocks) written to a temporary folder")
    parser.add_argument("--links", default="1,2,3", help="chain lengths to run (comma-separated; 1 always runs)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps of each run")
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs of each chain length, in the order 1..N then N..1 (step times pooled)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--bottom-layers", type=int, default=2)
    parser.add_argument("--top-layers", type=int, default=2)
    parser.add_argument("--trunk-device", default="cpu", help="where the trunks compute (cpu, cuda, cuda:N)")
    args = parser.parse_args(argv)
    transformers_logging.disable_progress_bar()  # a bar per weights load would bury the table
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the trunks on the way out
    lengths = sorted({1} | {int(n) for n in args.links.split(",") if n})
    if args.steps < 2 or args.rounds < 1:
        parser.error("--steps must be at least 2 (the first step warms up) and --rounds at least 1")

    with tempfile.TemporaryDirectory(prefix="chain-overhead-") as tmp:
        tmp_dir = Path(tmp)
        if args.tiny:
            model_dir = write_tiny_model(tmp_dir / "model", TinyModelSpec(arch="llama"))
            what = "tiny Llama"
        elif args.model:
            model_dir, what = args.model, args.model.name
        else:
            model_dir = random_weight_model(args.config, tmp_dir / "model")
            what = f"random weights of {args.config.name}"
        model_config = AutoConfig.from_pretrained(model_dir)
        num_layers = model_config.num_hidden_layers
        trunk_blocks = (args.bottom_layers, num_layers - args.top_layers)
        data = random_data(model_config.vocab_size, args.batch_size, args.seq_len)
        config = TrainConfig(lora=LORA, max_steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                             learning_rate=2e-4)
        secret = ClientSecret.generate()  # one key for every run: every trunk LoRA starts the same
        print(f"model: {what} ({model_config.model_type}, {num_layers} blocks, hidden {model_config.hidden_size}); "
              f"cut {args.bottom_layers}/{args.top_layers}: trunk blocks {trunk_blocks[0]}-{trunk_blocks[1] - 1}; "
              f"{args.steps} steps of {args.batch_size} x {args.seq_len} tokens, {args.rounds} round(s); trunks on "
              f"{args.trunk_device}, loopback; {torch.get_num_threads()} torch threads", flush=True)

        chains = [ChainRuns(link_ranges(*trunk_blocks, links)) for links in lengths]
        try:
            for chain in chains:
                chain.trunks = [start_trunk(model_dir, tmp_dir, "--device", args.trunk_device,
                                            layers=blocks_text(layers)) for layers in chain.layers]
            order = chains + chains[::-1]
            for index in range(args.rounds * len(chains)):
                chain = order[index % len(order)]
                train_once(chain, model_dir, config, data, secret)
                print(f"  {chain.label()} ({', '.join(blocks_text(r) for r in chain.layers)}): "
                      f"median step so far {chain.median_step_s:.3f} s, final loss {chain.losses[-1][-1]:.5f}",
                      flush=True)
        finally:
            for chain in chains:
                for trunk in chain.trunks:
                    trunk.stop()

    print()
    print_table(chains)
    single = chains[0]
    for chain in chains[1:]:
        ratio = chain.median_step_s / single.median_step_s
        per_link = (ratio - 1) / (chain.links - 1)
        verdict = "within" if per_link <= GOAL_PER_EXTRA_LINK else "over"
        print(f"{chain.label()}: step time {ratio:.3f} x one trunk's, {per_link:+.1%} per extra link "
              f"({verdict} the goal of {GOAL_PER_EXTRA_LINK:.0%} per extra link)")
    print(f"median step: over {len(single.durations)} steps per chain length ({args.rounds} run(s) of "
          f"{args.steps} steps, the first step of each left out); runs: the lowest and highest of the runs' own "
          "medians (how much the machine's speed moved); MiB/step: bytes to and from each link per optimizer step "
          "(median); max |Δloss|: the largest difference of any step's loss from the single trunk's first run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
