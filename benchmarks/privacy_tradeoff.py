"""What privacy costs: each cut and defense, the tokens a trunk owner reads, and the validation loss.

For every setting, a split run on the default model (SmolLM2-135M-Instruct) and the demo
dataset against a real trunk server on loopback (which lets sessions choose their cut), then
the leakage audit (``splitcore.privacy.audit``, with its strong attacks unless ``--no-strong``)
on a sample of the same data: once with the Bottom the run starts with and once with the Bottom
it trained; an attack's figure is the larger of the two (the trunk sees every step). Prints a
table: the share of a step's compute the cut leaves on the client, the share of tokens the best
attack on each channel reads, the final validation loss, that loss relative to the undefended
run at the trunk's default cut, and the mean training step time.

    .venv/bin/python benchmarks/privacy_tradeoff.py [--epochs 3] [--only NAME ...] [--no-strong] \
        [--json results.json] [--append] [--save-measured]

``--save-measured`` writes the figures to ``splitcore/privacy/measured_tradeoff.json``, where
the job form reads them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from splitcore import LoraSettings  # noqa: E402
from splitcore.data.formats import load_dataset_file  # noqa: E402
from splitcore.model import default_model  # noqa: E402
from splitcore.model.compute_share import compute_share  # noqa: E402
from splitcore.model.part_loading import CheckpointModel  # noqa: E402
from splitcore.privacy import ClientSecret, PrivacySettings  # noqa: E402
from splitcore.privacy.audit import (  # noqa: E402
    ATTACK_TITLES, AuditConfig, AuditReport, audit_privacy,
)
from splitcore.privacy.measured import MEASURED_PATH  # noqa: E402
from splitcore.remote.client import TrunkClient  # noqa: E402
from splitcore.remote.process import start_trunk  # noqa: E402
from splitcore.training import SplitEngine, SplitTrainer, TrainConfig  # noqa: E402
from splitcore.training.batches import prepare_training_data  # noqa: E402

DEMO_DATA = PROJECT_ROOT / "webapp" / "demo" / "lighthouse_keeper.jsonl"
BASELINE = "undefended, default cut"


@dataclass(frozen=True)
class Setting:
    name: str
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    train_trunk_lora: bool = True


SETTINGS = (
    Setting(BASELINE),
    Setting("Bottom 1 block", PrivacySettings(bottom_layers=1)),
    Setting("Bottom 4 blocks", PrivacySettings(bottom_layers=4)),
    Setting("Bottom 8 blocks", PrivacySettings(bottom_layers=8)),
    Setting("Top 8 blocks", PrivacySettings(top_layers=8)),
    Setting("Bottom 8 + Top 8 blocks", PrivacySettings(bottom_layers=8, top_layers=8)),
    Setting("Bottom 8 + Top 16 blocks", PrivacySettings(bottom_layers=8, top_layers=16)),
    Setting("hidden noise 0.5", PrivacySettings(hidden_noise=0.5)),
    Setting("hidden noise 2", PrivacySettings(hidden_noise=2.0)),
    Setting("hidden noise 8", PrivacySettings(hidden_noise=8.0)),
    Setting("gradient noise 4", PrivacySettings(grad_noise=4.0)),
    Setting("gradient noise 32", PrivacySettings(grad_noise=32.0)),
    Setting("NoPeek 1", PrivacySettings(nopeek=1.0)),
    Setting("NoPeek 10", PrivacySettings(nopeek=10.0)),
    Setting("private Bottom 0.3", PrivacySettings(private_bottom=0.3)),
    Setting("private Bottom 1", PrivacySettings(private_bottom=1.0)),
    Setting("private Bottom 1, distilled 100 steps", PrivacySettings(private_bottom=1.0, distill_bottom=100)),
    Setting("no gradients to the trunk", PrivacySettings(gradients_to_trunk=False), train_trunk_lora=False),
    Setting("private Bottom 1 + gradient noise 32", PrivacySettings(private_bottom=1.0, grad_noise=32.0)),
    Setting("private Bottom 1 + no gradients", PrivacySettings(private_bottom=1.0, gradients_to_trunk=False),
            train_trunk_lora=False),
    Setting("Bottom 4 + private Bottom 0.5 + no gradients",
            PrivacySettings(bottom_layers=4, private_bottom=0.5, gradients_to_trunk=False), train_trunk_lora=False),
    Setting("Bottom 8 + Top 8 + private Bottom 0.3 + no gradients",
            PrivacySettings(bottom_layers=8, top_layers=8, private_bottom=0.3, gradients_to_trunk=False),
            train_trunk_lora=False),
)


def train_and_audit(setting: Setting, model_dir: Path, examples, tokenizer, trunk, args, public: CheckpointModel,
                    attackers: dict) -> dict:
    config = TrainConfig(lora=LoraSettings(r=8, alpha=16, dropout=0.05), train_trunk_lora=setting.train_trunk_lora,
                         learning_rate=args.lr, epochs=args.epochs, batch_size=4, seq_len=args.seq_len,
                         val_fraction=0.15, seed=0, privacy=setting.privacy)
    data = prepare_training_data(tokenizer, examples, config)
    audit_config = AuditConfig(sample=args.sample, max_tokens=min(128, args.seq_len), strong=args.strong)
    started = time.perf_counter()
    with TrunkClient(trunk.address, trunk.token, timeout_s=600) as client:
        engine = SplitEngine(AutoModelForCausalLM.from_pretrained(model_dir), config, client,
                             secret=ClientSecret.generate(), label=f"privacy benchmark: {setting.name}",
                             tokenizer=tokenizer)  # a distilled private Bottom trains on public text first
        spec = engine.spec

        def audit(bottom) -> AuditReport:
            with engine.session_kept_alive():  # a strong audit outlasts the trunk session's lease
                report = audit_privacy(public, tokenizer, examples,
                                       setting.privacy, spec.n_bottom, spec.n_top, audit_config,
                                       bottom_adapter=bottom, lora=config.lora, attackers=attackers)
            print(f"  {setting.name}: audit in {report.seconds:.0f} s, worst {report.worst_rate:.1%}", file=sys.stderr,
                  flush=True)
            return report

        engine.train(False)
        first = audit(engine.bottom)
        trainer = SplitTrainer(engine, config, data, tokenizer.pad_token_id)
        training_started = time.perf_counter()
        result = trainer.run()
        training_seconds = time.perf_counter() - training_started
        engine.train(False)
        last = audit(engine.bottom)
        engine.close()
    rates = {r.name: max(r.rate, last.result(r.name).rate) for r in first.results}
    share = compute_share(json.loads((model_dir / "config.json").read_text()), spec.n_bottom, spec.n_top,
                          context=args.seq_len)
    return {"name": setting.name, "privacy": setting.privacy.to_dict(), "train_trunk_lora": setting.train_trunk_lora,
            "n_bottom": spec.n_bottom, "n_top": spec.n_top, "rates": rates, "strong_audit": audit_config.strong,
            "first_step": {r.name: r.rate for r in first.results}, "last_step": {r.name: r.rate for r in last.results},
            "client_share": round(share.client_share, 4), "step_seconds": round(training_seconds / result.step, 3),
            "val_loss": result.val_loss, "steps": result.step, "seconds": round(time.perf_counter() - started, 1)}


def markdown(rows: list[dict]) -> str:
    """One line per setting: compute split, each attack, the best per channel, the loss and the step time."""
    base = next(r["val_loss"] for r in rows if r["name"] == BASELINE)
    names = [name for name in ATTACK_TITLES if any(name in row["rates"] for row in rows)]
    short = {"learned_inversion": "linear map", "network_inversion": "network", "aligned_inversion": "aligned map",
             "exact_search": "candidate search", "gradient_labels": "labels (Top as identity)",
             "gradient_search": "labels (through the Top)"}
    header = (["setting", "audit", "cut (Bottom + Top)", "your workers' share"] + [short.get(n, n) for n in names]
              + ["worst", "validation loss", "vs undefended", "step time"])
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        rates = row["rates"]
        worst = max(rates.values())
        cells = [row["name"], "**strong**" if row.get("strong_audit") else "earlier", f"{row['n_bottom']} + {row['n_top']}",
                 f"{row['client_share']:.0%}" if "client_share" in row else "?"]
        cells += [f"{rates[n]:.1%}" if n in rates else "not run" for n in names]
        cells += [f"**{worst:.1%}**", f"{row['val_loss']:.4f}", f"{row['val_loss'] / row.get('baseline_val_loss', base) - 1:+.1%}",
                  f"{row['step_seconds']:.2f} s" if "step_seconds" in row else "?"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="default: the prepared default model")
    parser.add_argument("--data", type=Path, default=DEMO_DATA)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--sample", type=int, default=8, help="examples each audit attacks")
    parser.add_argument("--no-strong", dest="strong", action="store_false",
                        help="leave out the audit's strong attacks (the inversion network)")
    parser.add_argument("--only", nargs="*", help="names of the settings to run, in this order (the undefended one "
                                                  "always runs, first)")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows already in --json (or the measured file) and run only the settings "
                             "missing there; every setting gets a fresh client secret either way")
    parser.add_argument("--save-measured", action="store_true", help=f"write the rows to {MEASURED_PATH}")
    args = parser.parse_args()
    model_dir = args.model or default_model.prepare_default_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = load_dataset_file(args.data).examples
    target = args.json or (MEASURED_PATH if args.save_measured else None)
    rows = json.loads(target.read_text())["rows"] if args.append and target and target.is_file() else []
    done = {row["name"] for row in rows}
    by_name = {setting.name: setting for setting in SETTINGS}
    unknown = [name for name in args.only or () if name not in by_name]
    if unknown:
        parser.error(f"no setting named {unknown[0]!r}; the settings: {', '.join(by_name)}")
    # The baseline first, then --only's settings in the order given (a long run measures what matters first).
    wanted = [BASELINE, *(name for name in args.only if name != BASELINE)] if args.only else list(by_name)
    chosen = [by_name[name] for name in wanted if name not in done]
    with tempfile.TemporaryDirectory() as log_dir:
        trunk = start_trunk(model_dir, log_dir, "--min-bottom-layers", "1", "--min-top-layers", "1",
                            "--max-sessions", "2")
        # The trunk owner's public model, one for every audit: each reads only the blocks its cut needs.
        public = CheckpointModel(model_dir)
        attackers: dict = {}  # the attacker's preparation per (Bottom depth, noise), shared by the rows
        try:
            for setting in chosen:
                row = train_and_audit(setting, Path(model_dir), examples, tokenizer, trunk, args, public, attackers)
                rows.append(row)
                if args.json:  # a long run keeps what it measured so far (--append goes on from there)
                    args.json.write_text(json.dumps({"meta": {}, "rows": rows}, indent=2) + "\n")
                print(f"{row['name']}: {json.dumps(row['rates'])} val loss {row['val_loss']:.4f} "
                      f"({row['seconds']} s)", file=sys.stderr, flush=True)
        finally:
            trunk.stop()
    order = [s.name for s in SETTINGS]
    rows.sort(key=lambda row: order.index(row["name"]) if row["name"] in order else len(order))
    print(markdown(rows))
    meta = {"model": Path(model_dir).name, "data": args.data.name, "epochs": args.epochs, "lr": args.lr,
            "seq_len": args.seq_len, "audit_sample": args.sample, "audit_strong": args.strong,
            "model_config": json.loads((Path(model_dir) / "config.json").read_text())}
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    if args.save_measured:
        MEASURED_PATH.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
