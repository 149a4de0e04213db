"""``python -m splitcore``: prepare the default model, make tiny models, train, generate, audit privacy."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from splitcore.cli.privacy import add_audit_parser
from splitcore.cli.train import add_train_parser
from splitcore.cli.trunk import add_trunk_arguments, connect_trunks
from splitcore.generation.local import GenerationSettings, encode_prompt, generate_text, load_for_inference
from splitcore.model import default_model
from splitcore.model.tiny_models import TINY_ARCHS, TinyModelSpec, write_tiny_model


def _cmd_prepare_model(args: argparse.Namespace) -> int:
    directory = default_model.prepare_default_model(args.data_dir)
    print(directory)
    return 0


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    spec = TinyModelSpec(arch=args.arch, num_layers=args.layers, hidden_size=args.hidden_size, seed=args.seed)
    print(write_tiny_model(args.out, spec))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    model_dir = args.model
    if model_dir is None:
        model_dir = default_model.default_model_dir(args.data_dir)
        if not default_model.is_prepared(model_dir):
            raise FileNotFoundError(
                f"no --model given and the default model is not prepared in {model_dir}; "
                "run `python -m splitcore prepare-model` first"
            )
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    if args.trunk:
        return _generate_split(args, model_dir, settings)
    model, tokenizer = load_for_inference(model_dir, args.adapter)
    stream = sys.stdout.isatty()
    text = generate_text(model, tokenizer, args.prompt, settings, chat=args.chat, stream=stream)
    if not stream:
        print(text)
    return 0


def _generate_split(args: argparse.Namespace, model_dir, settings: GenerationSettings) -> int:
    from transformers import AutoTokenizer

    from splitcore.generation.split import SplitGenerator

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    input_ids = encode_prompt(tokenizer, args.prompt, args.chat)
    with connect_trunks(args) as clients:
        generator = SplitGenerator.from_directory(model_dir, clients, args.adapter)
        tokens: list[int] = []
        shown = ""
        for token in generator.generate(input_ids, tokenizer, settings):
            tokens.append(token)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            if sys.stdout.isatty():
                print(text[len(shown):], end="", flush=True)
                shown = text
    if sys.stdout.isatty():
        print()
    else:
        print(tokenizer.decode(tokens, skip_special_tokens=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m splitcore", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare-model", help="turn the bundled SmolLM2-135M-Instruct into a model directory")
    prepare.add_argument("--data-dir", help=f"data directory (default: ${default_model.DATA_DIR_ENV} or "
                                            "~/.local/share/splitlearn-studio)")
    prepare.set_defaults(handler=_cmd_prepare_model)

    tiny = commands.add_parser("make-tiny", help="write a tiny random model with a working tokenizer")
    tiny.add_argument("--arch", choices=TINY_ARCHS, required=True,
                      help=f"model family: {', '.join(TINY_ARCHS)} (gemma3: a Gemma 3 text model)")
    tiny.add_argument("--out", required=True, help="output directory")
    tiny.add_argument("--layers", type=int, default=TinyModelSpec.num_layers, help="decoder layers (default 6)")
    tiny.add_argument("--hidden-size", type=int, default=TinyModelSpec.hidden_size, help="hidden size (default 64)")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    tiny.set_defaults(handler=_cmd_make_tiny)

    gen = commands.add_parser("generate", help="generate text with a model and an optional adapter, locally or "
                                               "with the trunk on a trunk server (--trunk)")
    gen.add_argument("--model", help="model directory (default: the prepared default model)")
    gen.add_argument("--adapter", help="PEFT adapter directory to load on top of the model")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--chat", action="store_true",
                     help="apply the tokenizer's chat template to the prompt; an adapter trained on chat rows, or "
                          "on prompt/completion rows with a model that has a chat template, expects it")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--data-dir", help="data directory holding the default model")
    add_trunk_arguments(gen)
    gen.set_defaults(handler=_cmd_generate)

    add_train_parser(commands)
    add_audit_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
