"""``python -m splitcore audit-privacy``: what a trunk owner could read of a dataset at a given cut."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from splitcore.model.lora import LoraSettings
from splitcore.privacy.audit import AuditConfig, audit_privacy
from splitcore.privacy.settings import PrivacySettings


def add_audit_parser(commands) -> None:
    audit = commands.add_parser(
        "audit-privacy", help="measure how many of a dataset's tokens the trunk owner could read",
        description="Play an honest-but-curious trunk owner on this machine: it holds the public base weights "
                    "and public text, sees the hidden states and gradients of a run's first step, and tries to "
                    "read the data owner's tokens. Prints the share of tokens each attack reads.")
    audit.add_argument("--model", required=True, help="base model directory")
    audit.add_argument("--data", required=True, help="dataset file: .jsonl, .csv or .txt")
    audit.add_argument("--bottom-layers", type=int, required=True, help="decoder blocks kept here before the trunk")
    audit.add_argument("--top-layers", type=int, default=2, help="decoder blocks kept here after the trunk "
                                                                 "(default 2)")
    add_defense_arguments(audit)
    audit.add_argument("--lora-r", type=int, default=8, help="LoRA rank of the private Bottom (default 8)")
    audit.add_argument("--sample", type=int, default=AuditConfig.sample, help="examples attacked (default 8)")
    audit.add_argument("--max-tokens", type=int, default=AuditConfig.max_tokens,
                       help="tokens per example, as training truncates them (default 128)")
    audit.add_argument("--candidates", type=int, default=AuditConfig.candidates,
                       help="tokens per position the candidate search tries (default 16)")
    audit.add_argument("--public-tokens", type=int, default=AuditConfig.public_tokens,
                       help="size of the attacker's public text in tokens (default 8192)")
    audit.add_argument("--seed", type=int, default=0, help="which examples are sampled")
    audit.add_argument("--strong", action="store_true",
                       help="also run the strong attacks: an inversion network trained on a larger public text, "
                            "whose candidates the candidate search then tries (a minute or more on 2 CPU cores)")
    audit.add_argument("--strong-public-tokens", type=int, default=AuditConfig.strong_public_tokens,
                       help="public text the strong attacks train on, in tokens (default 32768)")
    audit.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    audit.set_defaults(handler=run_audit)


def add_defense_arguments(parser) -> None:
    """The defenses ``train`` applies and ``audit-privacy`` measures, under the same flags."""
    parser.add_argument("--hidden-noise", type=float, default=0.0,
                        help="clipped Gaussian noise on the hidden states sent to the trunk, as a share of a "
                             "typical hidden state's norm (0: off)")
    parser.add_argument("--grad-noise", type=float, default=0.0,
                        help="clipped Gaussian noise on the gradients sent back to the trunk (0: off)")
    parser.add_argument("--private-bottom", type=float, default=0.0,
                        help="start the Bottom's LoRA as a secret random change of each weight, of this size "
                             "relative to the weight (0: off)")
    parser.add_argument("--no-gradients-to-trunk", action="store_true",
                        help="never send the trunk a gradient: only the Top trains (needs --no-trunk-lora)")


def defense_settings(args: argparse.Namespace) -> dict:
    """The PrivacySettings fields of ``add_defense_arguments``' flags."""
    return {"hidden_noise": args.hidden_noise, "grad_noise": args.grad_noise, "private_bottom": args.private_bottom,
            "gradients_to_trunk": not args.no_gradients_to_trunk}


def run_audit(args: argparse.Namespace) -> int:
    settings = PrivacySettings(bottom_layers=args.bottom_layers, top_layers=args.top_layers,
                               **defense_settings(args))
    config = AuditConfig(sample=args.sample, max_tokens=args.max_tokens, candidates=args.candidates,
                         public_tokens=args.public_tokens, seed=args.seed, strong=args.strong,
                         strong_public_tokens=args.strong_public_tokens)
    model_dir, data = Path(args.model), Path(args.data)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model directory {model_dir} has no config.json")
    if not data.is_file():
        raise FileNotFoundError(f"dataset file {data} does not exist")

    from transformers import AutoTokenizer

    from splitcore.data.formats import load_dataset_file
    from splitcore.model.part_loading import CheckpointModel

    examples = load_dataset_file(data).examples
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # The client's Bottom and Top stay loaded; the trunk's blocks are read one at a time to play the trunk.
    model = CheckpointModel(model_dir)
    report = audit_privacy(model, tokenizer, examples, settings, args.bottom_layers, args.top_layers, config,
                           lora=LoraSettings(r=args.lora_r, alpha=2.0 * args.lora_r))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0
