"""The inversion network against the linear map: tokens read, top-16 hits and fit time.

On the default model (SmolLM2-135M-Instruct) and the demo data, for each setting (cut, hidden
noise, private Bottom): what the client's Bottom sends for the audit's sample (tokenised,
sampled and blurred as the leakage audit does it, with a fresh client secret), the public
Bottom's states on ``--public-tokens`` tokens of public text (``--corpus``), blurred with the
setting's noise as the attacker would, and both learned attacks fit on those same states:
the linear map (``attacks.fit_inversion``) and the inversion network
(``inversion_network.fit_inversion_network``, default config). For each attack: the share of
the sample's tokens it reads (top-1), the share it holds among its 16 best candidates (what
the candidate search gets to try) and the seconds its fit took (wall clock, and the process's
CPU seconds, which a busy machine inflates less).

    .venv/bin/python benchmarks/inversion_network.py [--public-tokens 32768] [--corpus extended] \
        [--sample 32] [--threads N] [--only NAME ...] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from splitcore import LoraSettings  # noqa: E402
from splitcore.data.formats import load_dataset_file  # noqa: E402
from splitcore.model import default_model  # noqa: E402
from splitcore.model.parts import split_model  # noqa: E402
from splitcore.privacy import ChannelNoise, ClientSecret, PrivacySettings, attacks  # noqa: E402
from splitcore.privacy.audit import (  # noqa: E402
    AuditConfig,
    _client_bottom,
    _input_embeddings,
    _pad_id,
    _run_client_bottom,
    _sample_batch,
)
from splitcore.privacy.inversion_network import (  # noqa: E402
    InversionNetworkConfig,
    fit_inversion_network,
    network_inversion,
    public_hidden_grid,
)
from splitcore.privacy.public_text import CORPORA, EXTENDED, public_token_chunks  # noqa: E402

DEMO_DATA = PROJECT_ROOT / "webapp" / "demo" / "lighthouse_keeper.jsonl"
CANDIDATES = 16
# The attacker's own randomness, as the audit draws it (unrelated to the client's secret).
ATTACKER_SEED = 7919


@dataclass(frozen=True)
class Setting:
    name: str
    n_bottom: int
    privacy: PrivacySettings = field(default_factory=PrivacySettings)


SETTINGS = (
    Setting("Bottom 2", 2),
    Setting("Bottom 8", 8),
    Setting("Bottom 2 + hidden noise 2", 2, PrivacySettings(hidden_noise=2.0)),
    Setting("Bottom 2 + private Bottom 1", 2, PrivacySettings(private_bottom=1.0)),
)


def _timed(work):
    """(work's result, wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def _rates(guesses: attacks.TokenGuesses, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(share read exactly, share among the best ``CANDIDATES``) over the real positions."""
    read, total = attacks.recovery(guesses.tokens, ids, mask)
    held = guesses.candidates[..., :CANDIDATES].eq(ids[..., None]).any(-1) & mask.bool()
    return read / total, int(held.sum()) / total


def measure(setting: Setting, model, tokenizer, examples, args) -> dict:
    bottom, _, _ = split_model(model, setting.n_bottom, 2)
    bottom.eval()
    batch = _sample_batch(tokenizer, examples, AuditConfig(sample=args.sample, max_tokens=args.max_tokens),
                          torch.device("cpu"))
    mask = batch.attention_mask
    channel = ChannelNoise(ClientSecret.generate(), seed=0, hidden_scale=setting.privacy.hidden_noise)
    with torch.no_grad():
        client_bottom = _client_bottom(bottom, None, setting.privacy, LoraSettings(), seed=0)
        received = channel.on_hidden(_run_client_bottom(client_bottom, batch), mask, step=0, micro_batch=0)

    chunks = public_token_chunks(tokenizer, args.public_tokens, args.max_tokens, corpus=args.corpus)
    generator = torch.Generator().manual_seed(ATTACKER_SEED)
    (hidden, public_mask, ids), states_wall, states_cpu = _timed(
        lambda: public_hidden_grid(bottom, chunks, _pad_id(tokenizer), setting.privacy.hidden_noise, generator))
    embeddings = _input_embeddings(bottom).detach()
    real = public_mask.bool()
    linear_map, linear_wall, linear_cpu = _timed(lambda: attacks.fit_inversion(hidden[real], embeddings[ids[real]]))
    network, network_wall, network_cpu = _timed(
        lambda: fit_inversion_network(hidden, public_mask, ids, embeddings, InversionNetworkConfig(seed=args.seed)))
    linear = _rates(attacks.learned_inversion(linear_map, embeddings, received, mask, CANDIDATES), batch.input_ids,
                    mask)
    learned = _rates(network_inversion(network, embeddings, received, mask, CANDIDATES), batch.input_ids, mask)
    return {"name": setting.name, "n_bottom": setting.n_bottom, "privacy": setting.privacy.to_dict(),
            "tokens": int(mask.sum()), "public_tokens": int(real.sum()),
            "linear": {"top1": linear[0], "top16": linear[1], "fit_s": linear_wall, "fit_cpu_s": linear_cpu},
            "network": {"top1": learned[0], "top16": learned[1], "fit_s": network_wall, "fit_cpu_s": network_cpu},
            "public_states_s": states_wall, "public_states_cpu_s": states_cpu}


def markdown(rows: list[dict]) -> str:
    header = ["setting", "linear map top-1", "network top-1", "linear map top-16", "network top-16",
              "linear map fit", "network fit (CPU)", "public states"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        linear, network = row["linear"], row["network"]
        lines.append("| " + " | ".join([
            row["name"], f"{linear['top1']:.1%}", f"**{network['top1']:.1%}**", f"{linear['top16']:.1%}",
            f"{network['top16']:.1%}", f"{linear['fit_s']:.1f} s", f"{network['fit_s']:.1f} s "
            f"({network['fit_cpu_s']:.0f} CPU s)", f"{row['public_states_s']:.0f} s"]) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="default: the prepared default model")
    parser.add_argument("--data", type=Path, default=DEMO_DATA)
    parser.add_argument("--sample", type=int, default=32, help="examples attacked (the audit's default is 8)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per example and per public chunk")
    parser.add_argument("--public-tokens", type=int, default=32768)
    parser.add_argument("--corpus", choices=CORPORA, default=EXTENDED)
    parser.add_argument("--seed", type=int, default=0, help="the network's seed")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--only", nargs="*", help="names of the settings to run")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model or default_model.prepare_default_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    examples = load_dataset_file(args.data).examples
    rows = []
    for setting in SETTINGS:
        if args.only and setting.name not in args.only:
            continue
        row = measure(setting, model, tokenizer, examples, args)
        rows.append(row)
        print(f"{row['name']}: linear {row['linear']['top1']:.1%} / {row['linear']['top16']:.1%}, network "
              f"{row['network']['top1']:.1%} / {row['network']['top16']:.1%} (fit {row['network']['fit_s']:.1f} s)",
              file=sys.stderr, flush=True)
    print(markdown(rows))
    if args.json:
        meta = {"model": Path(model_dir).name, "data": args.data.name, "sample": args.sample,
                "max_tokens": args.max_tokens, "public_tokens": args.public_tokens, "corpus": args.corpus,
                "threads": torch.get_num_threads(), "network": InversionNetworkConfig(seed=args.seed).__dict__}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
