"""What a chain of trunks costs: one trunk against chains of 2 and 3 links, on loopback.

The same model, data, key and settings run split against one trunk server and against chains of
trunk servers (``python -m trunk_server --layers A-B``, one process per link, the cut's trunk
blocks shared out evenly in block order). The runs take turns step by step: step 1 of every chain
length, then step 2 of each, and so on, so a change in the machine's speed (other processes on a
shared machine) falls on all of them alike, and each chain's step is compared with the single
trunk's step of the same number. Prints, per chain length:

- the median step time (the first step warms up and is left out);
- its cost against the single trunk: the median over the steps of (chain step / single-trunk
  step), with the middle half of those ratios, and that cost per extra link; each extra link adds
  a Forward and a Backward hop per micro-batch (goal: at most 5% per extra link on loopback);
- the bytes on the wire per optimizer step, per link (median): every link receives and returns
  hidden states of the same shape, so each link carries what a single trunk carries;
- the largest loss difference from the single trunk's run over all steps (every link's LoRA starts
  from the run's trunk seed, so a chain computes what one trunk computes, up to float32 rounding:
  the global gradient norm, for one, adds the links' squared norms rather than one trunk's sum).

By default the model has the default model's shape (``benchmarks/default_model_config.json``,
SmolLM2-135M-Instruct: 30 blocks, hidden 576) with random weights written to a temporary folder,
as ``gpu_check.py`` builds it (no download); ``--config`` takes any config.json, ``--model`` a
model directory, ``--tiny`` a tiny Llama (6 blocks) for a quick check. The client holds one copy
of the model's Bottom and Top per chain length.

    .venv/bin/python benchmarks/chain_overhead.py [--steps 20] [--links 1,2,3]
        [--batch-size 4] [--seq-len 128] [--bottom-layers 2] [--top-layers 2] [--trunk-device cpu]
        [--config benchmarks/default_model_config.json | --model DIR | --tiny]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import threading
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


class Turns:
    """Lets several trainers take one step each in turn, in a fixed order (a trainer that ends leaves it)."""

    def __init__(self, count: int) -> None:
        self._active = list(range(count))
        self._turn = 0
        self._changed = threading.Condition()

    def wait(self, index: int) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._turn == index)

    def pass_on(self, index: int) -> None:
        with self._changed:
            position = self._active.index(index)
            self._turn = self._active[(position + 1) % len(self._active)]
            self._changed.notify_all()

    def leave(self, index: int) -> None:
        with self._changed:
            if index in self._active:
                if self._turn == index and len(self._active) > 1:
                    position = self._active.index(index)
                    self._turn = self._active[(position + 1) % len(self._active)]
                self._active.remove(index)
            self._changed.notify_all()


@dataclass
class ChainRun:
    """The trunk processes of one chain length and what its run measured."""

    layers: list[range]
    trunks: list = field(default_factory=list)
    steps: list[StepMetrics] = field(default_factory=list)
    link_bytes: list[list[int]] = field(default_factory=list)  # per step: bytes to and from each link

    @property
    def links(self) -> int:
        return len(self.layers)

    def durations(self) -> list[float]:
        """Seconds of each step after the first (which warms up)."""
        elapsed = [s.elapsed_s for s in self.steps]
        return [b - a for a, b in zip(elapsed, elapsed[1:])]

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.durations())

    def ratios(self, single: ChainRun) -> list[float]:
        """This chain's step time over the single trunk's, step by step."""
        return [mine / theirs for mine, theirs in zip(self.durations(), single.durations(), strict=True)]

    def bytes_per_step(self) -> list[float]:
        """Median bytes per optimizer step to and from each link."""
        return [statistics.median(step[i] for step in self.link_bytes) for i in range(self.links)]

    def label(self) -> str:
        return "1 trunk" if self.links == 1 else f"chain of {self.links}"

    def blocks(self) -> str:
        return ", ".join(blocks_text(r) for r in self.layers)


def train_in_turns(chains: list[ChainRun], model_dir: Path, config: TrainConfig, data, secret: ClientSecret) -> None:
    """One split run per chain, all at once in threads that take one optimizer step each in turn."""
    clients = [[TrunkClient(trunk.address, trunk.token) for trunk in chain.trunks] for chain in chains]
    engines: list[SplitEngine] = []
    try:
        for chain, links in zip(chains, clients, strict=True):
            engine = SplitEngine(AutoModelForCausalLM.from_pretrained(model_dir), config, links, secret=secret)
            engines.append(engine)
            if [link.layers for link in engine.links] != chain.layers:
                raise RuntimeError(f"the engine planned {[link.layers for link in engine.links]}, not {chain.layers}")
        turns = Turns(len(chains))
        errors: list[BaseException] = []

        def run(index: int) -> None:
            chain, engine = chains[index], engines[index]
            last = [engine.wire_bytes_by_link()]

            def on_event(event) -> None:
                if isinstance(event, StepMetrics):
                    chain.steps.append(event)
                    now = engine.wire_bytes_by_link()
                    chain.link_bytes.append([b - a for a, b in zip(last[0], now)])
                    last[0] = now
                    turns.pass_on(index)

            def wait_for_turn() -> bool:  # the trainer asks before every step whether to stop
                turns.wait(index)
                return bool(errors)

            try:
                SplitTrainer(engine, config, data, PAD_ID, callbacks=[on_event], should_cancel=wait_for_turn).run()
            except BaseException as error:  # reported below, after every thread ends
                errors.append(error)
            finally:
                turns.leave(index)

        threads = [threading.Thread(target=run, args=(index,), name=f"chain-{chain.links}")
                   for index, chain in enumerate(chains)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
    finally:
        for engine in engines:
            engine.close()
        for client in (c for links in clients for c in links):
            client.close()


def print_table(chains: list[ChainRun]) -> None:
    single = chains[0]
    reference = [s.loss for s in single.steps]
    print(f"{'trunk':<11} {'blocks per link':<22} {'median step':>11} {'vs 1 trunk':>10} {'middle half':>13} "
          f"{'per extra link':>14} {'MiB/step per link':<24} {'max |Δloss|':>11}")
    for chain in chains:
        ratios = chain.ratios(single)
        ratio = statistics.median(ratios)
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratio, ratio, ratio]
        middle = f"{quartiles[0]:.3f}-{quartiles[2]:.3f}"
        per_link = f"{(ratio - 1) / (chain.links - 1):+.1%}" if chain.links > 1 else "-"
        delta = max(abs(s.loss - r) for s, r in zip(chain.steps, reference, strict=True))
        mib = ", ".join(f"{b / MIB:.2f}" for b in chain.bytes_per_step())
        print(f"{chain.label():<11} {chain.blocks():<22} {chain.median_step_s:>10.3f}s {ratio:>10.3f} {middle:>13} "
              f"{per_link:>14} {mib:<24} {delta:>11.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="a config.json: random weights of that shape (default: the default model's shape)")
    source.add_argument("--model", type=Path, help="a model directory instead of random weights")
    source.add_argument("--tiny", action="store_true", help="a tiny Llama (6 blocks) written to a temporary folder")
    parser.add_argument("--links", default="1,2,3", help="chain lengths to run (comma-separated; 1 always runs)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of each run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--bottom-layers", type=int, default=2)
    parser.add_argument("--top-layers", type=int, default=2)
    parser.add_argument("--trunk-device", default="cpu", help="where the trunks compute (cpu, cuda, cuda:N)")
    args = parser.parse_args(argv)
    transformers_logging.disable_progress_bar()  # a bar per weights load would bury the table
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the trunks on the way out
    lengths = sorted({1} | {int(n) for n in args.links.split(",") if n})
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step warms up)")

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
              f"{args.steps} steps of {args.batch_size} x {args.seq_len} tokens, fp32 on the wire; trunks on "
              f"{args.trunk_device}, loopback; {torch.get_num_threads()} torch threads", flush=True)

        chains = [ChainRun(link_ranges(*trunk_blocks, links)) for links in lengths]
        try:
            for chain in chains:
                chain.trunks = [start_trunk(model_dir, tmp_dir, "--device", args.trunk_device,
                                            layers=blocks_text(layers)) for layers in chain.layers]
                print(f"  {chain.label()}: trunk servers up for blocks {chain.blocks()}", flush=True)
            train_in_turns(chains, model_dir, config, data, secret)
        finally:
            for chain in chains:
                for trunk in chain.trunks:
                    trunk.stop()

    print()
    print_table(chains)
    single = chains[0]
    for chain in chains[1:]:
        ratio = statistics.median(chain.ratios(single))
        per_link = (ratio - 1) / (chain.links - 1)
        verdict = "within" if per_link <= GOAL_PER_EXTRA_LINK else "over"
        print(f"{chain.label()}: step time {ratio:.3f} x one trunk's, {per_link:+.1%} per extra link "
              f"({verdict} the goal of {GOAL_PER_EXTRA_LINK:.0%} per extra link)")
    print(f"median step: over {len(single.durations())} steps (the first left out); vs 1 trunk: the median over those "
          "steps of the chain's step time over the single trunk's step of the same number (the runs take turns step "
          "by step), with the middle half of those ratios; MiB/step: bytes to and from each link per optimizer step "
          "(median); max |Δloss|: the largest difference of any step's loss from the single trunk's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
