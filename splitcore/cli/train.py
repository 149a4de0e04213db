"""``python -m splitcore train``: fine-tune with the trunk on a trunk server, or locally."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from splitcore.cli.privacy import add_defense_arguments, defense_settings
from splitcore.cli.trunk import add_trunk_arguments, connect_trunks
from splitcore.model import default_model
from splitcore.model.devices import CLIENT_DTYPES, DEVICES, DTYPES, resolve_device
from splitcore.model.lora import ADAPTER_METHODS, LoraSettings
from splitcore.model.split_spec import SplitSpec
from splitcore.privacy import ClientSecret, PrivacySettings
from splitcore.privacy.client_secret import MIN_NONCE_BYTES
from splitcore.remote.messages import OptimizerSettings
from splitcore.remote.wire import FLOAT_ENCODINGS
from splitcore.training import SCHEDULES, LocalEngine, SplitEngine, SplitTrainer, TrainConfig
from splitcore.training.batches import prepare_training_data
from splitcore.training.checkpoints import CheckpointState, read_checkpoint_state
from splitcore.training.metrics_log import MetricsJsonl, ProgressReporter

TRAINING_ARGS = "training_args.json"
SECRET_FILE_NAME = "client-secret"
# training_args.json's name of the nonce mixed into the key file's key (public: without the key it derives nothing).
KEY_NONCE_ARG = "key_nonce"
# Blocks on each side of the cut for --local runs (the baseline of a split run with a trunk's default cut).
LOCAL_CUT = 2


def add_train_parser(commands) -> None:
    train = commands.add_parser(
        "train", help="fine-tune LoRA adapters on a dataset, split over a trunk server or locally",
        description="Fine-tune a causal LM with LoRA. With --trunk the middle blocks run on a trunk server and "
                    "only hidden states and their gradients leave this machine; --local runs the unsplit model "
                    "here (the baseline). Writes one PEFT adapter for the whole model to --out.")
    train.add_argument("--model", required=True, help="base model directory")
    train.add_argument("--data", required=True, help="dataset file: .jsonl, .csv or .txt")
    train.add_argument("--out", required=True, help="directory for the merged PEFT adapter")
    train.add_argument("--local", action="store_true", help="train the unsplit model in this process "
                                                            "(instead of --trunk)")
    add_trunk_arguments(train)
    length = train.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=float, help="passes over the training examples (default 1)")
    train.add_argument("--batch-size", type=int, default=4)
    train.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    train.add_argument("--seq-len", type=int, default=512, help="examples are truncated to this many tokens")
    train.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    train.add_argument("--warmup", type=int, default=0, help="warmup steps")
    train.add_argument("--schedule", choices=SCHEDULES, default="linear")
    train.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--adapter-method", default="lora", metavar="METHOD",
                       help=f"peft method on all three parts: {', '.join(ADAPTER_METHODS)} (default: lora); methods "
                            "that cannot be split (adalora, vera, ...) are refused with the reason")
    train.add_argument("--use-dora", action="store_true", help="LoRA only: DoRA (weight magnitude apart)")
    train.add_argument("--use-rslora", action="store_true", help="LoRA only: rank-stabilised scaling alpha / sqrt(r)")
    train.add_argument("--lora-r", type=int, default=8)
    train.add_argument("--lora-alpha", type=float, default=16.0)
    train.add_argument("--lora-dropout", type=float, default=0.05)
    train.add_argument("--lora-targets", help="comma-separated module names (default: every projection)")
    train.add_argument("--no-trunk-lora", action="store_true", help="keep the trunk frozen; train Bottom and Top")
    train.add_argument("--device", default="cpu", help=f"where this machine's parts compute: {DEVICES}")
    train.add_argument("--dtype", choices=CLIENT_DTYPES, default="fp32",
                       help="dtype of the frozen weights this machine holds (adapters and optimizer stay fp32; "
                            "default fp32)")
    train.add_argument("--wire", choices=FLOAT_ENCODINGS, default="fp32", help="encoding of tensors on the wire")
    train.add_argument("--val-fraction", type=float, default=0.0, help="share of examples held out for validation")
    train.add_argument("--eval-every", type=int, default=0, help="validate every N steps (0: at the end)")
    train.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N steps (0: at the end)")
    train.add_argument("--checkpoint-dir", help="where checkpoints go (default: OUT/checkpoints)")
    train.add_argument("--resume", metavar="CHECKPOINT_DIR", help="resume from a checkpoint (or its parent)")
    train.add_argument("--metrics-jsonl", metavar="FILE", help="append one JSON object per step and evaluation")
    privacy = train.add_argument_group("privacy", "what the trunk sees (docs/privacy.md has the measured effect)")
    privacy.add_argument("--bottom-layers", type=int,
                         help="decoder blocks kept here before the trunk (default: the trunk's default cut; "
                              f"--local: {LOCAL_CUT})")
    privacy.add_argument("--top-layers", type=int,
                         help=f"decoder blocks kept here after the trunk (default: the trunk's; --local: {LOCAL_CUT})")
    add_defense_arguments(privacy)
    privacy.add_argument("--nopeek", type=float, default=0.0,
                         help="weight of the NoPeek term that trains the Bottom to decorrelate what it sends from "
                              "its input (0: off)")
    privacy.add_argument("--distill-bottom", type=int, default=0, metavar="STEPS",
                         help="before the first step, distil the private Bottom (--private-bottom) for this many "
                              "steps on public text through the trunk, to keep the public model's predictions while "
                              "a linear map fit on its output reads less (0: off; a resumed run keeps its "
                              "checkpoint's Bottom)")
    privacy.add_argument("--secret-file", help="this machine's client secret, from which the seeds the trunk is "
                                               "sent, the noise and the private Bottom are derived, mixed with a "
                                               "fresh nonce per run (recorded in the checkpoints, reused by "
                                               f"--resume) (default: {SECRET_FILE_NAME} in the data directory; "
                                               "created when missing)")
    privacy.add_argument("--key-nonce", metavar="HEX",
                         help="mix this nonce into the key instead of a fresh random one, to repeat a run exactly "
                              f"(a run's nonce is {KEY_NONCE_ARG!r} in its {TRAINING_ARGS}), e.g. a --local "
                              "baseline of a split run; --resume reuses the checkpoint's nonce by itself")
    train.set_defaults(handler=run_train)


def train_config(args: argparse.Namespace) -> TrainConfig:
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()) if args.lora_targets else ()
    return TrainConfig(
        lora=LoraSettings(method=args.adapter_method, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                          target_modules=targets, use_dora=args.use_dora, use_rslora=args.use_rslora),
        train_trunk_lora=not args.no_trunk_lora,
        optimizer=OptimizerSettings(weight_decay=args.weight_decay),
        learning_rate=args.lr, max_steps=args.steps, epochs=args.epochs if args.steps is None else None,
        batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len, warmup_steps=args.warmup,
        schedule=args.schedule, max_grad_norm=args.max_grad_norm, seed=args.seed, val_fraction=args.val_fraction,
        eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, wire_encoding=args.wire,
        privacy=PrivacySettings(bottom_layers=args.bottom_layers, top_layers=args.top_layers, nopeek=args.nopeek,
                                distill_bottom=args.distill_bottom, **defense_settings(args)),
    )


def _nonce(text: str, where: str) -> bytes:
    try:
        nonce = bytes.fromhex(text)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: the key nonce {text!r} is not hex digits") from None
    if len(nonce) < MIN_NONCE_BYTES:
        raise ValueError(f"{where}: the key nonce has {len(nonce)} bytes; it needs at least {MIN_NONCE_BYTES} "
                         f"({MIN_NONCE_BYTES * 2} hex digits)")
    return nonce


def client_secret(args: argparse.Namespace, resume: CheckpointState | None = None) -> ClientSecret:
    """This run's key: the key file's mixed with a nonce. The nonce is the one ``resume``'s checkpoint recorded
    (a checkpoint from before nonces resumes with the key file's own key), else ``--key-nonce``, else a fresh
    random one. The key is never printed."""
    path = Path(args.secret_file) if args.secret_file else default_model.data_dir() / SECRET_FILE_NAME
    key = ClientSecret.load_or_create(path)
    given = _nonce(args.key_nonce, "--key-nonce") if args.key_nonce else None
    if resume is None:
        return key.with_nonce(given if given is not None else ClientSecret.fresh_nonce())
    recorded = resume.settings.get("client_nonce")
    nonce = _nonce(recorded, f"checkpoint {args.resume}") if recorded is not None else None
    if given is not None and given != nonce:
        raise ValueError(f"--key-nonce {args.key_nonce} differs from the nonce of checkpoint {args.resume} "
                         f"({recorded or 'none'}); a resumed run keeps its own nonce: leave --key-nonce out")
    return key if nonce is None else key.with_nonce(nonce)


def run_train(args: argparse.Namespace) -> int:
    if args.epochs is None and args.steps is None:
        args.epochs = 1.0
    if args.local == bool(args.trunk):
        raise ValueError("choose where the trunk runs: either --trunk HOST:PORT (HOST:PORT,HOST:PORT,... for a chain "
                         "of trunks) or --local")
    config = train_config(args)
    out = Path(args.out)
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else out / "checkpoints"
    resume = read_checkpoint_state(args.resume) if args.resume else None

    from transformers import AutoTokenizer

    from splitcore.data.examples import uses_chat_template
    from splitcore.data.formats import load_dataset_file
    from splitcore.model.part_loading import CheckpointModel

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model directory {model_dir} has no config.json")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = load_dataset_file(args.data)
    data = prepare_training_data(tokenizer, dataset.examples, config)
    secret = client_secret(args, resume)
    device = resolve_device(args.device)
    # Split runs read only the Bottom's and Top's blocks once the trunk says where it cuts; --local reads them all.
    model = CheckpointModel(model_dir, dtype=DTYPES[args.dtype], device=device)
    if args.local:
        spec = SplitSpec(num_layers=model.num_layers,
                         n_bottom=LOCAL_CUT if args.bottom_layers is None else args.bottom_layers,
                         n_top=LOCAL_CUT if args.top_layers is None else args.top_layers)
        engine = LocalEngine(model, config, spec, secret=secret, device=device)
    else:
        distils = config.privacy.distill_bottom > 0 and resume is None  # a checkpoint holds the distilled Bottom
        if distils:
            print(f"distilling the private Bottom for {config.privacy.distill_bottom} steps on public text",
                  file=sys.stderr)
        engine = SplitEngine(model, config, connect_trunks(args, config.wire_encoding), label=f"cli:{out.name}",
                             secret=secret, device=device, tokenizer=tokenizer if distils else None)
        if engine.distillation is not None:
            print(engine.distillation.describe(), file=sys.stderr)

    cancel = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: _request_cancel(cancel, previous))
    metrics = MetricsJsonl(args.metrics_jsonl, resume_step=resume.step if resume else None) if args.metrics_jsonl else None
    progress = ProgressReporter(sys.stderr)
    callbacks = [progress] + ([metrics] if metrics else [])
    trainer = SplitTrainer(engine, config, data, tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                           else tokenizer.eos_token_id, checkpoint_dir=checkpoint_dir, callbacks=callbacks,
                           should_cancel=cancel.is_set)
    try:
        print(f"{len(data.train)} training and {len(data.val)} validation examples"
              + (f" ({data.dropped} without a trained token dropped)" if data.dropped else "")
              + f"; {trainer.total_steps} steps", file=sys.stderr)
        result = trainer.run(resume_from=args.resume)
        progress.close()
        if result.status == "cancelled":
            print(f"cancelled after step {result.step}; resume with --resume {result.checkpoint}", file=sys.stderr)
            return 130
        trainer.export_adapter(out, str(model_dir))
        (out / TRAINING_ARGS).write_text(json.dumps(
            {"base_model": str(model_dir), "data": str(args.data), "mode": trainer.mode,
             "trunk": args.trunk, "dtype": args.dtype, KEY_NONCE_ARG: secret.nonce.hex() if secret.nonce else None,
             **config.to_dict()}, indent=2))
    finally:
        progress.close()
        if metrics:
            metrics.close()
        engine.close()
        signal.signal(signal.SIGINT, previous)
    val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(f"trained {result.step} steps: loss {result.loss:.4f}{val}; adapter written to {out}", file=sys.stderr)
    if uses_chat_template(tokenizer, dataset.kind):
        print(f"the examples trained in the chat template of {model_dir.name}; ask the adapter the same way: "
              "generate --chat", file=sys.stderr)
    print(out)
    return 0


def _request_cancel(cancel: threading.Event, previous) -> None:
    if cancel.is_set():
        signal.signal(signal.SIGINT, previous)
        raise KeyboardInterrupt
    print("\nstopping after this step (Ctrl-C again to abort at once)", file=sys.stderr)
    cancel.set()
