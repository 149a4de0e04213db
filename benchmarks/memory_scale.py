"""Memory at real model sizes: what each process holds against the weights it needs.

Every process loads only its pieces of the model: a trunk server its range of blocks in its
dtype, a client (CLI or web worker) the embeddings, its first and last blocks, the final norm
and the LM head. This benchmark builds a random-weight model of a published shape (configs in
``benchmarks/configs``: SmolLM2-1.7B, Llama-3.2-3B, Llama-3.1-8B, Llama-3.1-70B), runs each
kind of process in a subprocess of its own and prints its resident memory against the bytes of
the weights that process needs:

- peak: VmHWM, the kernel's high-water mark of the process's resident memory (the trunk's read
  from /proc at each point; a process that ends by itself writes its own /proc/self/status as
  it exits, since the rusage of wait4 carries the forking parent's high-water mark across exec);
- steady: VmRSS (the trunk: at each point; a run: the median of samples taken every 50 ms over
  the second half of its life, when it works rather than loads), split into anon (RssAnon:
  memory the process allocated) and file (RssFile: mapped pages of files, i.e. checkpoint
  tensors that safetensors hands out as views of the mapped file when no cast is needed, and
  shared libraries); pk.anon: the largest RssAnon sampled;
- needed: the weights the process needs, from the config (trunk: its blocks in the trunk dtype;
  client: embeddings + k + m blocks + final norm, + LM head if untied, in the client dtype);
- goal: peak <= 1.3 x needed + 0.5 GiB (PASS / over).

Scenarios (``--scenarios``, all by default): ``trunk`` the trunk server starting; ``sessions``
that trunk with 1, 2 and 4 open training sessions, each after one Forward, Backward and Step
of batch 1 x ``--seq-len``; ``cli`` a ``python -m splitcore train`` split run of ``--steps``
against that trunk, once per ``--client-dtypes``; ``worker`` one process doing what a web worker
does with two jobs and a playground generation at once (one ``FrozenWeightStore``, two
``SplitEngine`` and one ``SplitGenerator`` over ``CheckpointModel``, trained and generating in
threads); ``merge`` ``merge_adapter`` of the CLI run's adapter onto the model.

The random model is written straight to sharded safetensors, tensor by tensor, from the
parameter names and shapes of a meta-device skeleton (never the whole model in memory), with
the tiny byte-level tokenizer of ``splitcore.model.tiny_models`` (its ids fit any vocabulary).
It is cached under ``--work-dir`` and reused by later runs.

    .venv/bin/python benchmarks/memory_scale.py --config smollm2-1.7b
    .venv/bin/python benchmarks/memory_scale.py --config llama-3.2-3b --scenarios trunk,cli
    .venv/bin/python benchmarks/memory_scale.py --config smollm2-1.7b --fp32-checkpoint --scenarios trunk,cli
    .venv/bin/python benchmarks/memory_scale.py --dry-run                  # every config: the plan, nothing built
    .venv/bin/python benchmarks/memory_scale.py --dry-run --config llama-3.1-70b --bottom-layers 4 --top-layers 4

``--dry-run`` prints, for any config, the parameters of each piece, the bytes a trunk (bf16,
fp16, fp32) and a client (fp32, bf16; cut 2+2 and ``--bottom-layers``/``--top-layers``) need,
the allowance 1.3 x needed + 0.5 GiB, and how many trunks of ``--gpu-gib`` a chain needs.
Activations, KV caches, adapters and optimizer state come on top of the weights; at batch 1 x
64 tokens they are small next to the allowance.

It then plans a chain of trunks for each config on devices of ``--devices`` GiB (24, 40, 48, 80
and 141 by default), in ``--trunk-dtype`` at the cut ``--bottom-layers``/``--top-layers``: the
fewest links whose weights each fit the device within the allowance (less ``--reserve-gib``
kept free per device for long sequences or many sessions), the blocks shared out as evenly as
that number of links allows, and for every model that needs more than one link somewhere, each
link's block range with its ``python -m trunk_server --layers A-B`` command and the client's
``--trunk`` line:

    .venv/bin/python benchmarks/memory_scale.py --dry-run --config llama-3.1-70b
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoConfig, PretrainedConfig  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
GIB = 1 << 30
GOAL_FACTOR = 1.3
GOAL_SLACK = 0.5 * GIB
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SAFETENSORS_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
WEIGHT_STD = 0.02
MARKER = "memory_scale.json"  # written last into a model directory: its presence means the model is complete
POLL_S = 0.05
SCENARIOS = ("trunk", "sessions", "cli", "worker", "merge")
SESSION_COUNTS = (1, 2, 4)
# Nominal memory of common devices (GiB): 24 (RTX 4090, L4), 40 (A100 40GB), 48 (L40S, RTX 6000 Ada),
# 80 (A100/H100 80GB), 141 (H200). What a program can allocate is a little less.
DEVICE_GIB = (24, 40, 48, 80, 141)
WORDS = ("split learning keeps every token of the data with its owner while a remote trunk computes the middle "
         "layers of the model and returns hidden states and gradients to the client machine").split()


def goal_bytes(needed: int) -> float:
    return GOAL_FACTOR * needed + GOAL_SLACK


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3f}{unit}" if unit == "B" else f"{n / size:.1f}{unit}"
    return str(n)


# ----------------------------------------------------------------------------- configs and counts


def resolve_config(name: str) -> Path:
    """A config by name (a file in benchmarks/configs, with or without .json) or by path."""
    for candidate in (Path(name), CONFIG_DIR / name, CONFIG_DIR / f"{name}.json"):
        if candidate.is_file():
            return candidate.resolve()
        if candidate.is_dir() and (candidate / "config.json").is_file():
            return (candidate / "config.json").resolve()
    known = ", ".join(p.stem for p in sorted(CONFIG_DIR.glob("*.json")))
    raise SystemExit(f"no config {name!r}: give a path to a config.json or one of {known}")


def all_configs() -> list[Path]:
    return sorted(CONFIG_DIR.glob("*.json"))


def load_config(path: Path) -> PretrainedConfig:
    return AutoConfig.from_pretrained(str(path))


@dataclass(frozen=True)
class PieceCounts:
    """Parameters of each piece of a decoder-only model."""

    embeddings: int
    blocks: tuple[int, ...]  # one entry per decoder block, by global index
    norm: int
    lm_head: int  # 0 when tied to the embeddings
    tied: bool

    @property
    def total(self) -> int:
        return self.embeddings + sum(self.blocks) + self.norm + self.lm_head

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def trunk(self, n_bottom: int, n_top: int) -> int:
        return sum(self.blocks[n_bottom:self.num_layers - n_top])

    def client(self, n_bottom: int, n_top: int) -> int:
        return (self.embeddings + sum(self.blocks[:n_bottom]) + sum(self.blocks[self.num_layers - n_top:])
                + self.norm + self.lm_head)


LLAMA_LIKE = {"llama", "mistral", "qwen2"}


def analytic_counts(config: PretrainedConfig) -> PieceCounts:
    """Piece sizes of a Llama-like config from its numbers alone (any other family: the meta skeleton)."""
    if config.model_type not in LLAMA_LIKE:
        return skeleton_counts(config)
    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim  # q, o; k, v
    if getattr(config, "attention_bias", config.model_type == "qwen2"):
        attention += heads * head_dim + 2 * kv * head_dim + (hidden if config.model_type == "llama" else 0)
    mlp = 3 * hidden * inter + ((2 * inter + hidden) if getattr(config, "mlp_bias", False) else 0)
    block = attention + mlp + 2 * hidden  # + input and post-attention RMSNorm
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return PieceCounts(embeddings=vocab * hidden, blocks=(block,) * config.num_hidden_layers, norm=hidden,
                       lm_head=0 if tied else vocab * hidden, tied=tied)


def meta_skeleton(config: PretrainedConfig):
    from splitcore.model.part_loading import empty_model

    return empty_model(config)


def tied_keys(model) -> set[str]:
    """Parameter names a tied checkpoint does not store (the LM head when it is the input embeddings)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return set(keys if not isinstance(keys, dict) else keys.keys())


def skeleton_counts(config: PretrainedConfig) -> PieceCounts:
    """Piece sizes from the parameters of a meta-device skeleton (no memory, works for any family)."""
    from splitcore.model.architectures import family_for

    model = meta_skeleton(config)
    family = family_for(config)
    layers_prefix = f"{family.backbone_attr}.{family.layers_attr}."
    embedding_prefixes = tuple(f"{family.backbone_attr}.{name}." for name in family.embedding_attrs)
    blocks = [0] * family.num_layers(config)
    embeddings = norm = lm_head = 0
    skip = tied_keys(model)
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in skip:
            continue
        if name.startswith(layers_prefix):
            blocks[int(name[len(layers_prefix):].split(".", 1)[0])] += param.numel()
        elif name.startswith(embedding_prefixes):
            embeddings += param.numel()
        elif name.startswith("lm_head."):
            lm_head += param.numel()
        else:
            norm += param.numel()
    return PieceCounts(embeddings=embeddings, blocks=tuple(blocks), norm=norm, lm_head=lm_head, tied=bool(skip))


# ----------------------------------------------------------------------------- dry run


def chain_trunks(block_bytes: int, n_blocks: int, device_bytes: float, allowance: bool = True) -> tuple[int, int]:
    """(blocks one trunk of ``device_bytes`` holds, trunks a chain needs for ``n_blocks``)."""
    if allowance:
        per_trunk = int((device_bytes - GOAL_SLACK) // (GOAL_FACTOR * block_bytes))
    else:
        per_trunk = int(device_bytes // block_bytes)
    if per_trunk <= 0:
        return 0, 0
    return per_trunk, math.ceil(n_blocks / per_trunk)


def dry_run_report(path: Path, cuts: list[tuple[int, int]], gpu_gib: float, check_skeleton: bool = True) -> dict:
    """Print the theoretical figures of one config; returns them (for the summary and the tests)."""
    config = load_config(path)
    counts = analytic_counts(config)
    skeleton = skeleton_counts(config) if check_skeleton else None
    name = path.stem if path.name != "config.json" else path.parent.name
    print(f"\n=== {name} ({path}) ===")
    print(f"{config.architectures[0] if config.architectures else config.model_type}: {counts.num_layers} layers, "
          f"hidden {config.hidden_size}, vocab {config.vocab_size}, "
          f"{'tied' if counts.tied else 'untied'} embeddings")
    check = ""
    if skeleton is not None:
        check = " (meta skeleton: equal)" if skeleton == counts else \
            f" (meta skeleton: {skeleton.total:,} -- DIFFERS)"
    print(f"parameters: {counts.total:,} = {human_count(counts.total)}{check}")
    print(f"  embeddings {human_count(counts.embeddings)}, one block {human_count(counts.blocks[0])}, "
          f"final norm {counts.norm:,}, LM head {human_count(counts.lm_head) if counts.lm_head else 'tied (0)'}")
    result = {"name": name, "params": counts.total, "skeleton_params": skeleton.total if skeleton else None,
              "counts": asdict(counts), "cuts": {}}
    print(f"{'process':<34} {'params':>10} {'needed GiB':>11} {'allowance GiB':>14}")
    for n_bottom, n_top in cuts:
        trunk = counts.trunk(n_bottom, n_top)
        client = counts.client(n_bottom, n_top)
        cut = {"trunk_params": trunk, "client_params": client}
        first, last = n_bottom, counts.num_layers - n_top - 1
        for dtype in ("bf16", "fp16", "fp32"):
            needed = trunk * DTYPE_BYTES[dtype]
            cut[f"trunk_{dtype}"] = needed
            print(f"{f'trunk {dtype}, blocks {first}-{last} (cut {n_bottom}+{n_top})':<34} {human_count(trunk):>10} "
                  f"{gib(needed):>11} {gib(goal_bytes(needed)):>14}")
        for dtype in ("fp32", "bf16"):
            needed = client * DTYPE_BYTES[dtype]
            cut[f"client_{dtype}"] = needed
            print(f"{f'client {dtype} (cut {n_bottom}+{n_top})':<34} {human_count(client):>10} "
                  f"{gib(needed):>11} {gib(goal_bytes(needed)):>14}")
        n_blocks = counts.num_layers - n_bottom - n_top
        for dtype in ("bf16", "fp32"):
            per_trunk, trunks = chain_trunks(counts.blocks[0] * DTYPE_BYTES[dtype], n_blocks, gpu_gib * GIB)
            raw_per, raw_trunks = chain_trunks(counts.blocks[0] * DTYPE_BYTES[dtype], n_blocks, gpu_gib * GIB,
                                               allowance=False)
            cut[f"chain_{dtype}"] = trunks
            print(f"  {gpu_gib:g} GiB devices, trunk {dtype}, cut {n_bottom}+{n_top}: one trunk holds up to {per_trunk} "
                  f"blocks within the allowance ({raw_per} by weights alone); {n_blocks} to hold -> a chain of "
                  f"{trunks} trunk{'s' if trunks != 1 else ''} ({raw_trunks} by weights alone)")
        result["cuts"][f"{n_bottom}+{n_top}"] = cut
    return result


def link_fits(weight_bytes: float, device_bytes: float) -> bool:
    """Whether a trunk holding ``weight_bytes`` of blocks stays within a device of ``device_bytes``: its
    allowance (1.3 x the weights + 0.5 GiB) leaves room for the CUDA context, sessions' adapters,
    optimizer state and activations."""
    return goal_bytes(weight_bytes) <= device_bytes


def _pack(block_bytes: Sequence[int], first: int, capacity: float) -> list[range]:
    """Blocks in order, each link taking as many as fit ``capacity`` bytes of weights."""
    links, start, held = [], first, 0
    for index, size in enumerate(block_bytes, start=first):
        if held and held + size > capacity:
            links.append(range(start, index))
            start, held = index, 0
        held += size
    links.append(range(start, first + len(block_bytes)))
    return links


def _balance(block_bytes: Sequence[int], first: int, capacity: float, links: int) -> list[range] | None:
    """Blocks in order over ``links`` links, each taking blocks until it holds the average of what is left
    (never above ``capacity``); None when that does not come out in ``links`` links."""
    ranges, start, left = [], 0, sum(block_bytes)
    for remaining in range(links, 0, -1):
        if start == len(block_bytes):
            return None
        end, held = start, 0
        while end < len(block_bytes) and held + block_bytes[end] <= capacity and (remaining == 1 or
                                                                                 held < left / remaining):
            held += block_bytes[end]
            end += 1
        if end == start:
            return None
        ranges.append(range(first + start, first + end))
        start, left = end, left - held
    return ranges if start == len(block_bytes) else None


def plan_chain_links(block_bytes: Sequence[int], first: int, device_bytes: float) -> list[range]:
    """The links of a chain of trunks on devices of ``device_bytes``, for the blocks ``first`` to
    ``first + len(block_bytes) - 1`` (``block_bytes``: each block's weights in the trunk's dtype).

    The fewest links that hold the blocks in order with each link's weights within the allowance
    (``link_fits``), the blocks shared out so that the largest link is as small as that number of
    links allows, and the others as close to the average as the blocks' sizes allow. The ranges are
    contiguous and meet end to end. ValueError when a block alone does
    not fit the device.
    """
    if not block_bytes:
        raise ValueError("no trunk blocks to place")
    for index, size in enumerate(block_bytes, start=first):
        if not link_fits(size, device_bytes):
            raise ValueError(f"block {index} alone needs {gib(goal_bytes(size))} GiB with its allowance; a device "
                             f"of {gib(device_bytes)} GiB cannot hold it")
    most = (device_bytes - GOAL_SLACK) / GOAL_FACTOR  # the most weights one link may hold
    links = len(_pack(block_bytes, first, most))
    low, high = max(block_bytes), int(most)  # the smallest capacity that still packs into ``links`` links
    while low < high:
        middle = (low + high) // 2
        if len(_pack(block_bytes, first, middle)) <= links:
            high = middle
        else:
            low = middle + 1
    return _balance(block_bytes, first, low, links) or _pack(block_bytes, first, low)


def chain_plan_report(results: list[dict], n_bottom: int, n_top: int, dtype: str, devices_gib: Sequence[float],
                      reserve_gib: float = 0.0) -> None:
    """Links per device size for every config; each link's blocks and command where a model needs a chain."""
    from splitcore.model.split_spec import SplitSpec

    width = max(16, max(len(r["name"]) for r in results))
    room = f", {reserve_gib:g} GiB kept free per device" if reserve_gib else ""
    print(f"\n=== chain of trunks, cut {n_bottom}+{n_top}, trunk {dtype}: links per device (each link within "
          f"1.3 x its weights + 0.5 GiB{room}) ===")
    print(f"{'model':<{width}} {'trunk blocks':>14} {'weights GiB':>12} "
          + " ".join(f"{f'{d:g} GiB':>8}" for d in devices_gib))
    chained = []
    for r in results:
        counts = PieceCounts(**{**r["counts"], "blocks": tuple(r["counts"]["blocks"])})
        trunk = SplitSpec(counts.num_layers, n_bottom, n_top).trunk_layers
        block_bytes = [counts.blocks[i] * DTYPE_BYTES[dtype] for i in trunk]
        plans: dict[float, list[range] | None] = {}
        for device in devices_gib:
            try:
                plans[device] = plan_chain_links(block_bytes, trunk.start, (device - reserve_gib) * GIB)
            except ValueError:
                plans[device] = None
        r.setdefault("chains", {})[f"{n_bottom}+{n_top} {dtype}"] = plans
        print(f"{r['name']:<{width}} {f'{trunk.start}-{trunk.stop - 1} ({len(trunk)})':>14} "
              f"{gib(sum(block_bytes)):>12} " + " ".join(f"{len(p) if p else '-':>8}" for p in plans.values()))
        if any(p and len(p) > 1 for p in plans.values()):
            chained.append((r, counts, trunk, block_bytes, plans))
    print("Trunks per chain ('-': one block alone does not fit such a device).")
    for r, counts, trunk, block_bytes, plans in chained:
        client = counts.client(n_bottom, n_top)
        print(f"\n--- {r['name']}: trunk {dtype}, cut {n_bottom}+{n_top}: blocks {trunk.start}-{trunk.stop - 1} "
              f"on the chain, {gib(max(block_bytes))} GiB per block; the client runs blocks 0-{n_bottom - 1} and "
              f"{trunk.stop}-{counts.num_layers - 1} with the embeddings, norm and head: "
              f"{gib(client * DTYPE_BYTES['fp32'])} GiB in fp32, {gib(client * DTYPE_BYTES['bf16'])} GiB in bf16 ---")
        same: dict[tuple[range, ...], list[float]] = {}  # devices that get the same links share one listing
        for device, links in plans.items():
            if links and len(links) > 1:
                same.setdefault(tuple(links), []).append(device)
        for links, devices in same.items():
            sizes = " and ".join(", ".join(f"{d:g}" for d in devices).rsplit(", ", 1))
            print(f"{sizes} GiB devices: a chain of {len(links)} trunks")
            for number, layers in enumerate(links, start=1):
                weights = sum(block_bytes[layers.start - trunk.start:layers.stop - trunk.start])
                print(f"  link {number}: blocks {layers.start}-{layers.stop - 1} ({len(layers)}), weights "
                      f"{gib(weights)} GiB, allowance {gib(goal_bytes(weights))} GiB: python -m trunk_server "
                      f"--model DIR --layers {layers.start}-{layers.stop - 1} --dtype {dtype} --device cuda "
                      "--host 0.0.0.0 --port 50051")
            addresses = ",".join(f"gpu{number}:50051" for number in range(1, len(links) + 1))
            print(f"  client: python -m splitcore train --model DIR --data FILE --out DIR --trunk {addresses} "
                  f"--token-file TOKEN_FILE --bottom-layers {n_bottom} --top-layers {n_top}")


def print_plan(results: list[dict], cut: str, gpu_gib: float) -> None:
    """Model size -> RAM for a worker slot, RAM/GPU memory for a trunk (weights needed / allowance)."""
    print(f"\n=== memory plan, cut {cut}: needed / allowed (1.3 x needed + 0.5 GiB), GiB ===")
    print(f"{'model':<16} {'params':>9} {'worker slot fp32':>17} {'worker slot bf16':>17} {'trunk bf16':>16} "
          f"{'trunk fp32':>16} {f'{gpu_gib:g}GiB trunks (bf16)':>20}")
    for r in results:
        c = r["cuts"][cut]
        pair = lambda n: f"{gib(n)} / {gib(goal_bytes(n))}"  # noqa: E731
        print(f"{r['name']:<16} {human_count(r['params']):>9} {pair(c['client_fp32']):>17} "
              f"{pair(c['client_bf16']):>17} {pair(c['trunk_bf16']):>16} {pair(c['trunk_fp32']):>16} "
              f"{c['chain_bf16']:>20}")
    print("A worker slot (one pool process) holds one model's Bottom+Top once for its job, the job's audits and "
          "the jobs after it (shared weights); add the running job's activations and adapter. A trunk adds its "
          "sessions' LoRA, optimizer state and activations. A model past one device runs on a chain of trunks, "
          "each serving a range of blocks (python -m trunk_server --layers A-B): see the chain plan below.")


# ----------------------------------------------------------------------------- the random model


def free_bytes(path: Path) -> int:
    path = Path(path)
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _seed_of(name: str, seed: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Seeded weights: N(0, 0.02) for matrices, ones for norm weights, zeros for biases."""
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1:  # RMSNorm / LayerNorm weights
        return torch.ones(shape, dtype=dtype)
    generator = torch.Generator().manual_seed(_seed_of(name, seed))
    return torch.randn(shape, generator=generator, dtype=torch.float32).mul_(WEIGHT_STD).to(dtype)


def checkpoint_plan(config: PretrainedConfig) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors a checkpoint of ``config`` stores, in the skeleton's order (a tied LM head omitted)."""
    model = meta_skeleton(config)
    skip = tied_keys(model)
    seen, plan = set(), []
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in skip or name in seen:
            continue
        seen.add(name)
        plan.append((name, tuple(param.shape)))
    return plan


def write_random_model(config_path: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16,
                       shard_bytes: int = 2 * 10**9, seed: int = 0, log=print) -> Path:
    """Write a random-weight model of ``config_path`` to ``out_dir`` (sharded safetensors + index, config,
    tokenizer), one tensor at a time; reuse ``out_dir`` when it already holds the same model."""
    from safetensors.torch import save_file

    from splitcore.model.tiny_models import build_tokenizer

    out_dir = Path(out_dir)
    raw = Path(config_path).read_text()
    key = {"config_sha256": hashlib.sha256(raw.encode()).hexdigest(), "dtype": SAFETENSORS_NAMES[dtype],
           "seed": seed, "std": WEIGHT_STD}
    marker = out_dir / MARKER
    if marker.is_file():
        try:
            if {k: v for k, v in json.loads(marker.read_text()).items() if k in key} == key:
                log(f"reusing the model written earlier in {out_dir}")
                return out_dir
        except (OSError, ValueError):
            pass
    config = load_config(Path(config_path))
    plan = checkpoint_plan(config)
    element = torch.tensor([], dtype=dtype).element_size()
    total = sum(math.prod(shape) for _, shape in plan) * element
    free = free_bytes(out_dir.parent)
    if free < total + GIB:
        raise SystemExit(f"not enough disk space for the model: it needs {gib(total)} GiB (+1 GiB spare), "
                         f"{out_dir.parent} has {gib(free)} GiB free; free some, or choose --work-dir elsewhere")
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.mkdir(parents=True)
    log(f"writing a random {SAFETENSORS_NAMES[dtype]} model of {config_path.name} ({len(plan)} tensors, "
        f"{gib(total)} GiB) to {out_dir}")
    started = time.perf_counter()
    shards: list[list[str]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            save_file(pending, str(staging / f"shard-{len(shards):05d}.tmp"), metadata={"format": "pt"})
            shards.append(list(pending))
            pending, pending_bytes = {}, 0

    for name, shape in plan:
        nbytes = math.prod(shape) * element
        if pending and pending_bytes + nbytes > shard_bytes:
            flush()
        pending[name] = random_tensor(name, shape, dtype, seed)
        pending_bytes += nbytes
    flush()
    count = len(shards)
    weight_map = {}
    if count == 1:
        (staging / "shard-00000.tmp").rename(staging / "model.safetensors")
    else:
        for index, names in enumerate(shards):
            file = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            (staging / f"shard-{index:05d}.tmp").rename(staging / file)
            weight_map.update({name: file for name in names})
        (staging / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    config_json = json.loads(raw)
    config_json.pop("dtype", None)
    config_json["torch_dtype"] = SAFETENSORS_NAMES[dtype]
    (staging / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    build_tokenizer().save_pretrained(staging)
    (staging / MARKER).write_text(json.dumps({**key, "total_size": total, "shards": count,
                                              "config": str(config_path)}, indent=2))
    staging.rename(out_dir)
    log(f"wrote {count} shard{'s' if count != 1 else ''} in {time.perf_counter() - started:.0f} s")
    return out_dir


def write_dataset(path: Path, examples: int = 64, words: int = 120, seed: int = 0) -> Path:
    """Plain text, one example per block of lines: long enough for any --seq-len up to a few hundred."""
    import random

    rng = random.Random(seed)
    path.write_text("\n\n".join(" ".join(rng.choices(WORDS, k=words)) for _ in range(examples)) + "\n")
    return path


# ----------------------------------------------------------------------------- measuring


def read_status(pid: int | str = "self") -> dict[str, int] | None:
    """VmRSS, VmHWM, RssAnon, RssFile of a process in bytes (None once it is gone)."""
    try:
        fields = parse_status(Path(f"/proc/{pid}/status").read_text())
    except OSError:  # the process is gone
        return None
    return fields if "VmRSS" in fields else None


class Poller:
    """Samples a process's memory every ``POLL_S`` seconds in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.hwm = self.max_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> dict[str, int] | None:
        status = read_status(self.pid)
        if status:
            self.samples.append((time.monotonic(), status))
            self.hwm = max(self.hwm, status.get("VmHWM", 0))
            self.max_anon = max(self.max_anon, status.get("RssAnon", 0))
        return status

    @property
    def last(self) -> dict[str, int]:
        return self.samples[-1][1] if self.samples else {}

    def steady(self) -> dict[str, int]:
        """Median VmRSS, RssAnon and RssFile over the second half of the process's life (its work, not its
        loading)."""
        if not self.samples:
            return {}
        middle = (self.samples[0][0] + self.samples[-1][0]) / 2
        late = [status for at, status in self.samples if at >= middle]
        return {key: int(statistics.median(s.get(key, 0) for s in late)) for key in ("VmRSS", "RssAnon", "RssFile")}

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(POLL_S)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Row:
    scenario: str
    peak: int  # VmHWM
    steady: int  # VmRSS
    anon: int  # RssAnon at the same moment(s) as steady
    file: int  # RssFile (mapped checkpoint pages, shared libraries) at the same moment(s)
    peak_anon: int  # the largest RssAnon seen
    needed: int
    seconds: float = 0.0
    note: str = ""

    @classmethod
    def of(cls, scenario: str, status: dict[str, int], needed: int, seconds: float, note: str = "",
           peak_anon: int | None = None) -> Row:
        """A row from one reading of /proc/PID/status."""
        return cls(scenario, status["VmHWM"], status["VmRSS"], status.get("RssAnon", 0), status.get("RssFile", 0),
                   status.get("RssAnon", 0) if peak_anon is None else peak_anon, needed, seconds, note)

    @property
    def goal(self) -> float:
        return goal_bytes(self.needed)

    @property
    def passed(self) -> bool:
        return self.peak <= self.goal


def print_rows(title: str, rows: list[Row]) -> None:
    print(f"\n=== {title} ===")
    print(f"{'scenario':<46} {'peak':>6} {'steady':>6} {'anon':>6} {'file':>6} {'pk.anon':>7} {'needed':>6} "
          f"{'peak/need':>9} {'goal':>6} {'result':>6} {'time':>6}")
    for r in rows:
        ratio = r.peak / r.needed if r.needed else float("nan")
        print(f"{r.scenario:<46} {gib(r.peak):>6} {gib(r.steady):>6} {gib(r.anon):>6} {gib(r.file):>6} "
              f"{gib(r.peak_anon):>7} {gib(r.needed):>6} {ratio:>9.2f} {gib(r.goal):>6} "
              f"{'PASS' if r.passed else 'over':>6} {r.seconds:>5.0f}s" + (f"  {r.note}" if r.note else ""))
    print("GiB. peak: VmHWM (the process's final high-water mark); steady: VmRSS (trunk: at that point; a run: the "
          "median over the second half of its life), split into anon (RssAnon) and file (RssFile: mapped "
          "checkpoint pages and libraries); pk.anon: the largest RssAnon sampled; goal: peak <= 1.3 x needed + "
          "0.5 GiB.")


# The exact peak of a process that ends by itself: it writes its /proc/self/status as it exits. (Not the
# rusage of wait4: Linux carries the high-water mark of the forked parent across exec into it.)
STATUS_AT_EXIT = "MEMORY_SCALE_STATUS_FILE"
_CLI_WRAPPER = (
    "import atexit, os, runpy, sys\n"
    f"out = os.environ['{STATUS_AT_EXIT}']\n"
    "atexit.register(lambda: open(out, 'w').write(open('/proc/self/status').read()))\n"
    "sys.argv[0] = 'splitcore'\n"
    "runpy.run_module('splitcore', run_name='__main__', alter_sys=True)\n"
)


def report_status_at_exit() -> None:
    out = os.environ.get(STATUS_AT_EXIT)
    if out:
        import atexit

        atexit.register(lambda: Path(out).write_text(Path("/proc/self/status").read_text()))


def parse_status(text: str) -> dict[str, int]:
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


@dataclass
class Measured:
    code: int
    poller: Poller
    at_exit: dict[str, int]  # /proc/self/status as it exited (empty when it could not write it)
    seconds: float
    last_line: str

    @property
    def peak(self) -> int:
        return max(self.at_exit.get("VmHWM", 0), self.poller.hwm)

    def row(self, scenario: str, needed: int, note: str = "") -> Row:
        steady = self.poller.steady()
        return Row(scenario, self.peak, steady.get("VmRSS", 0), steady.get("RssAnon", 0), steady.get("RssFile", 0),
                   self.poller.max_anon, needed, self.seconds, note)


def run_measured(command: list[str], log_path: Path, timeout_s: float = 1800) -> Measured:
    """Run ``command`` to its end, sampling its memory."""
    started = time.perf_counter()
    status_file = log_path.with_suffix(".status")
    status_file.unlink(missing_ok=True)
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, text=True, cwd=PROJECT_ROOT,
                                   env={**os.environ, STATUS_AT_EXIT: str(status_file)})
    poller = Poller(process.pid)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    poller.stop()
    reader.join(5)
    at_exit = parse_status(status_file.read_text()) if status_file.is_file() else {}
    return Measured(process.returncode, poller, at_exit, time.perf_counter() - started,
                    lines[-1].strip() if lines else "")


# ----------------------------------------------------------------------------- child processes


def child_worker(args) -> int:
    """Two jobs and a generation in one process over one shared store, as a web worker runs them."""
    from transformers import AutoTokenizer

    from splitcore.data.formats import load_dataset_file
    from splitcore.generation.local import GenerationSettings
    from splitcore.generation.split import SplitGenerator
    from splitcore.model.part_loading import CheckpointModel, FrozenWeightStore
    from splitcore.remote.client import TrunkClient
    from splitcore.training import SplitEngine, SplitTrainer, TrainConfig
    from splitcore.training.batches import prepare_training_data

    token = Path(args.token_file).read_text().strip()
    store = FrozenWeightStore(budget_bytes=int(args.worker_cache_gb * GIB))
    model = CheckpointModel(args.model_dir, dtype=TORCH_DTYPES[args.worker_dtype], store=store)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    config = TrainConfig(max_steps=args.steps, batch_size=1, seq_len=args.seq_len)
    data = prepare_training_data(tokenizer, load_dataset_file(args.data).examples, config)
    clients = [TrunkClient(args.trunk, token) for _ in range(3)]
    engines = [SplitEngine(model, config, clients[i], label=f"job {i + 1}") for i in range(2)]
    generator = SplitGenerator(model, clients[2])
    loaded = read_status()
    errors: list[BaseException] = []
    tokens: list[int] = []

    def guarded(work):
        def run():
            try:
                work()
            except BaseException as exc:  # reported by the parent
                errors.append(exc)
        return run

    trainers = [SplitTrainer(engine, config, data, tokenizer.pad_token_id) for engine in engines]
    prompt = tokenizer("The trunk computes the middle layers", return_tensors="pt").input_ids
    threads = [threading.Thread(target=guarded(t.run)) for t in trainers]
    threads.append(threading.Thread(target=guarded(lambda: tokens.extend(generator.generate(
        prompt, tokenizer, GenerationSettings(max_new_tokens=args.new_tokens))))))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = read_status()
    for engine in engines:
        engine.close()
    for client in clients:
        client.close()
    if errors:
        raise errors[0]
    print(json.dumps({"loaded_rss": loaded["VmRSS"], "after_rss": after["VmRSS"],
                      "losses": [t.loss for t in trainers], "tokens": len(tokens),
                      "store_bytes": store.kept_bytes}), flush=True)
    return 0


def child_merge(args) -> int:
    from splitcore.model.merge import merge_adapter

    extra = {"max_shard_size": args.merge_shard_size} if args.merge_shard_size else {}
    merge_adapter(args.model_dir, args.adapter, args.out, **extra)
    print(json.dumps({"merged": str(args.out)}), flush=True)
    return 0


# ----------------------------------------------------------------------------- scenarios


@dataclass
class Context:
    args: argparse.Namespace
    counts: PieceCounts
    model_dir: Path
    run_dir: Path
    data: Path
    token_file: Path
    label: str
    rows: list[Row] = field(default_factory=list)
    adapter: Path | None = None


def measure_trunk(ctx: Context, trunk, load_s: float) -> None:
    args = ctx.args
    needed = ctx.counts.trunk(args.bottom_layers, args.top_layers) * DTYPE_BYTES[args.trunk_dtype]
    first, last = args.bottom_layers, ctx.counts.num_layers - args.top_layers - 1
    time.sleep(2)  # let the server settle after it says it listens
    status = read_status(trunk.pid)
    if "trunk" in args.scenarios:
        ctx.rows.append(Row.of(f"trunk start ({args.trunk_dtype}, blocks {first}-{last})", status, needed, load_s))
    if "sessions" not in args.scenarios:
        return
    from splitcore import LoraSettings
    from splitcore.remote.client import TrunkClient

    clients = []
    hidden_size = load_config(ctx.model_dir / "config.json").hidden_size
    try:
        for n in SESSION_COUNTS:
            started = time.perf_counter()
            while len(clients) < n:
                client = TrunkClient(trunk.address, trunk.token)
                clients.append(client)
                client.open_session(LoraSettings(), seed=len(clients))
                hidden = torch.randn(1, args.seq_len, hidden_size)
                mask = torch.ones(1, args.seq_len, dtype=torch.long)
                client.forward(1, 0, hidden, mask)
                client.backward(1, 0, torch.randn_like(hidden), hidden, mask)
                client.step(1, 1e-4)
            status = read_status(trunk.pid)
            ctx.rows.append(Row.of(f"trunk + {n} training session{'s' if n > 1 else ''} (1x{args.seq_len})",
                                   status, needed, time.perf_counter() - started))
    finally:
        for client in clients:
            client.close_session_quietly()
            client.close()
    time.sleep(2)
    status = read_status(trunk.pid)
    ctx.rows.append(Row.of(f"trunk, those {len(clients)} sessions closed", status, needed, 0))


def measure_cli(ctx: Context, trunk) -> None:
    args = ctx.args
    for dtype in args.client_dtypes:
        out = ctx.run_dir / f"cli-{dtype}"
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, "-c", _CLI_WRAPPER, "train", "--model", str(ctx.model_dir), "--data", str(ctx.data),
                   "--out", str(out), "--trunk", trunk.address, "--token-file", str(ctx.token_file),
                   "--steps", str(args.steps), "--batch-size", "1", "--seq-len", str(args.seq_len), "--dtype", dtype,
                   "--secret-file", str(ctx.run_dir / "client-secret")]
        print(f"  CLI run, client {dtype}: {' '.join(command[1:])}", flush=True)
        run = run_measured(command, ctx.run_dir / f"cli-{dtype}.log")
        needed = ctx.counts.client(args.bottom_layers, args.top_layers) * DTYPE_BYTES[dtype]
        note = "" if run.code == 0 else f"FAILED (exit {run.code}; see {ctx.run_dir / f'cli-{dtype}.log'})"
        ctx.rows.append(run.row(f"CLI split run, client {dtype}, {args.steps} steps", needed, note))
        if run.code == 0 and (out / "adapter_config.json").is_file():
            ctx.adapter = out


def measure_worker(ctx: Context, trunk) -> None:
    args = ctx.args
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "worker", "--model-dir", str(ctx.model_dir),
               "--trunk", trunk.address, "--token-file", str(ctx.token_file), "--data", str(ctx.data),
               "--worker-dtype", args.worker_dtype, "--worker-cache-gb", str(args.worker_cache_gb),
               "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--new-tokens", str(args.new_tokens)]
    print(f"  worker: 2 jobs + 1 generation, {args.worker_dtype}", flush=True)
    run = run_measured(command, ctx.run_dir / "worker.log")
    needed = ctx.counts.client(args.bottom_layers, args.top_layers) * DTYPE_BYTES[args.worker_dtype]
    note = f"FAILED (exit {run.code}; see {ctx.run_dir / 'worker.log'})" if run.code else ""
    if run.code == 0:
        try:
            report = json.loads(run.last_line)
            note = (f"RSS {gib(report['loaded_rss'])} after building 2 engines + generator; store "
                    f"{gib(report['store_bytes'])} GiB; {report['tokens']} tokens generated")
        except ValueError:
            pass
    ctx.rows.append(run.row(f"worker: 2 jobs + 1 generation ({args.worker_dtype})", needed, note))


def measure_merge(ctx: Context) -> None:
    args = ctx.args
    from splitcore.model import merge

    if ctx.adapter is None:
        for dtype in ("fp32", "bf16"):
            if (ctx.run_dir / f"cli-{dtype}" / "adapter_config.json").is_file():
                ctx.adapter = ctx.run_dir / f"cli-{dtype}"
                break
    if ctx.adapter is None:
        print("  merge: no adapter from a CLI run here yet; run the cli scenario first (skipped)")
        return
    out = ctx.run_dir / "merged"
    shutil.rmtree(out, ignore_errors=True)
    model_bytes = sum(p.stat().st_size for p in ctx.model_dir.glob("*.safetensors"))
    if free_bytes(ctx.run_dir) < model_bytes + GIB:
        print(f"  merge: skipped, it writes {gib(model_bytes)} GiB and {ctx.run_dir} has "
              f"{gib(free_bytes(ctx.run_dir))} GiB free")
        return
    shard_limit = merge.shard_size_bytes(args.merge_shard_size or merge.MAX_SHARD_SIZE)
    adapter_bytes = sum(p.stat().st_size for p in ctx.adapter.glob("*.safetensors"))
    needed = min(model_bytes, shard_limit) + adapter_bytes
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "merge", "--model-dir", str(ctx.model_dir),
               "--adapter", str(ctx.adapter), "--out", str(out)]
    if args.merge_shard_size:
        command += ["--merge-shard-size", args.merge_shard_size]
    print(f"  merge: {ctx.adapter.name} onto {ctx.model_dir.name}", flush=True)
    run = run_measured(command, ctx.run_dir / "merge.log")
    note = f"FAILED (exit {run.code}; see {ctx.run_dir / 'merge.log'})" if run.code else \
        f"needed = one output shard ({gib(min(model_bytes, shard_limit))}) + adapter"
    ctx.rows.append(run.row(f"merge_adapter ({ctx.adapter.name} adapter)", needed, note))
    shutil.rmtree(out, ignore_errors=True)


def measure(args) -> int:
    from splitcore.remote.process import start_trunk

    config_path = resolve_config(args.config)
    config = load_config(config_path)
    counts = analytic_counts(config)
    checkpoint_dtype = torch.float32 if args.fp32_checkpoint else torch.bfloat16
    ck = "fp32" if args.fp32_checkpoint else "bf16"
    name = config_path.stem if config_path.name != "config.json" else config_path.parent.name
    work = Path(args.work_dir)
    model_dir = write_random_model(config_path, work / "models" / f"{name}-{ck}", checkpoint_dtype,
                                   int(args.shard_gb * 1e9), seed=args.seed)
    run_dir = work / "runs" / f"{name}-{ck}"
    run_dir.mkdir(parents=True, exist_ok=True)
    data = write_dataset(run_dir / "data.txt")
    token = secrets.token_hex(24)
    token_file = run_dir / "trunk-token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    label = f"{name}, {ck} checkpoint, cut {args.bottom_layers}+{args.top_layers}, trunk {args.trunk_dtype}"
    ctx = Context(args, counts, model_dir, run_dir, data, token_file, label)
    available = (read_meminfo().get("MemAvailable", 0))
    print(f"{label}: {human_count(counts.total)} parameters; MemAvailable {gib(available)} GiB", flush=True)

    wants_trunk = any(s in args.scenarios for s in ("trunk", "sessions", "cli", "worker"))
    if wants_trunk:
        started = time.perf_counter()
        trunk = start_trunk(model_dir, run_dir, "--dtype", args.trunk_dtype, "--max-sessions", "8",
                            n_bottom=args.bottom_layers, n_top=args.top_layers, token=token, startup_timeout_s=1200)
        load_s = time.perf_counter() - started
        print(f"  trunk up in {load_s:.0f} s at {trunk.address} (log {trunk.log_path})", flush=True)
        try:
            measure_trunk(ctx, trunk, load_s)
            if "cli" in args.scenarios:
                measure_cli(ctx, trunk)
            if "worker" in args.scenarios:
                measure_worker(ctx, trunk)
            status = read_status(trunk.pid)
            if status and "trunk" in args.scenarios:
                needed = counts.trunk(args.bottom_layers, args.top_layers) * DTYPE_BYTES[args.trunk_dtype]
                ctx.rows.append(Row.of("trunk at the end (every client above gone)", status, needed,
                                       time.perf_counter() - started))
        finally:
            trunk.stop()
    if "merge" in args.scenarios:
        measure_merge(ctx)
    print_rows(label, ctx.rows)
    if args.json:
        with open(args.json, "a") as handle:
            handle.write(json.dumps({"label": label, "rows": [{**asdict(r), "goal": r.goal, "passed": r.passed}
                                                              for r in ctx.rows]}) + "\n")
    return 0 if all(r.passed and not r.note.startswith("FAILED") for r in ctx.rows) else 1


def read_meminfo() -> dict[str, int]:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines}


# ----------------------------------------------------------------------------- command line


def default_work_dir() -> Path:
    data = os.environ.get("SPLITLEARN_DATA_DIR")
    return Path(data) / "memory-scale" if data else Path("/tmp/splitlearn-memory-scale")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="a config in benchmarks/configs (smollm2-1.7b, llama-3.2-3b, llama-3.1-8b, "
                             "llama-3.1-70b) or a path; --dry-run takes a comma-separated list (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="print the theoretical figures; build nothing")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated: {', '.join(SCENARIOS)}")
    parser.add_argument("--trunk-dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--client-dtypes", "--client-dtype", default="fp32,bf16",
                        help="dtypes of the CLI runs' frozen weights (comma-separated)")
    parser.add_argument("--worker-dtype", choices=("fp32", "bf16"), default="fp32",
                        help="the worker's frozen weights (WORKER_DTYPE; default fp32 as in the settings)")
    parser.add_argument("--worker-cache-gb", type=float, default=8.0, help="the store's budget (WORKER_MODEL_CACHE_GB)")
    parser.add_argument("--fp32-checkpoint", action="store_true", help="write the random model in fp32 (else bf16)")
    parser.add_argument("--bottom-layers", type=int, default=2)
    parser.add_argument("--top-layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps of each training run")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens the worker's generation produces")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="shard size of the written model (GB)")
    parser.add_argument("--merge-shard-size", default=None, help="max_shard_size of merge_adapter (its default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--work-dir", type=Path, default=default_work_dir(),
                        help="where models and runs are kept (default: $SPLITLEARN_DATA_DIR/memory-scale or "
                             "/tmp/splitlearn-memory-scale)")
    parser.add_argument("--gpu-gib", type=float, default=80.0,
                        help="device memory of one trunk, for the chain count of each config and the memory plan")
    parser.add_argument("--devices", default=",".join(f"{d:g}" for d in DEVICE_GIB),
                        help="device sizes (GiB, comma-separated) the chain plan places trunk links on")
    parser.add_argument("--reserve-gib", type=float, default=0.0,
                        help="memory the chain plan keeps free on each device beyond the allowance (long "
                             "sequences, many sessions)")
    parser.add_argument("--json", help="append the measured rows to this JSON-lines file")
    # Internal: the benchmark runs its worker and merge scenarios as children of itself.
    parser.add_argument("--child", choices=("worker", "merge"), help=argparse.SUPPRESS)
    for name in ("--model-dir", "--trunk", "--token-file", "--data", "--adapter", "--out"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {', '.join(sorted(unknown))}; choose from {', '.join(SCENARIOS)}")
    try:
        args.devices = [float(d) for d in args.devices.split(",") if d.strip()]
    except ValueError:
        parser.error(f"--devices: sizes in GiB, comma-separated (e.g. 24,80), got {args.devices!r}")
    if not args.devices or any(d <= args.reserve_gib for d in args.devices):
        parser.error("--devices: at least one size, each larger than --reserve-gib")
    args.client_dtypes = [d for d in args.client_dtypes.split(",") if d]
    if set(args.client_dtypes) - {"fp32", "bf16"}:
        parser.error("--client-dtypes: fp32 and/or bf16")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        report_status_at_exit()
    if args.child == "worker":
        return child_worker(args)
    if args.child == "merge":
        return child_merge(args)
    if args.dry_run:
        paths = [resolve_config(c) for c in args.config.split(",")] if args.config else all_configs()
        paths.sort(key=lambda p: analytic_counts(load_config(p)).total)
        cuts = [(2, 2)] + ([(args.bottom_layers, args.top_layers)] if (args.bottom_layers, args.top_layers) != (2, 2)
                           else [])
        results = [dry_run_report(path, cuts, args.gpu_gib) for path in paths]
        for n_bottom, n_top in cuts:
            print_plan(results, f"{n_bottom}+{n_top}", args.gpu_gib)
        chain_plan_report(results, args.bottom_layers, args.top_layers, args.trunk_dtype, args.devices,
                          args.reserve_gib)
        return 0
    if not args.config:
        raise SystemExit("--config: which model shape to build and measure (or --dry-run)")
    return measure(args)


if __name__ == "__main__":
    sys.exit(main())
