"""``python -m trunk_server --model DIR --bottom-layers K --top-layers M --port P``, or
``python -m trunk_server --model DIR --layers A-B --port P``.

``--layers A-B`` serves exactly blocks A to B (a link of a chain of trunks: the client runs the
blocks before the first link and after the last one, the links the rest in order); the server
reads only those blocks. Otherwise ``--bottom-layers``/``--top-layers`` set the default cut. ``--min-bottom-layers`` and
``--min-top-layers`` let sessions choose their own cut: the server then holds every block
between them and each session runs the range its client asks for. ``--device`` and
``--dtype`` choose where and in which dtype the frozen blocks compute; the budget options
bound what one session may ask for. ``--metrics-port`` serves Prometheus metrics at ``/metrics``
on a port of their own (off by default).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from splitcore.cli.stop_signal import StopSignal
from splitcore.cli.trunk import TOKEN_ENV, resolve_token
from splitcore.model.devices import DEVICES, DTYPES
from splitcore.process_memory import limit_malloc_arenas

from .config import SessionBudgets, TrunkServerConfig

_BUDGET_HELP = {
    "max_micro_batches": "micro-batch indices per step",
    "max_tokens_per_request": "rows x positions in one Forward or Backward",
    "max_saved_graphs": "autograd graphs kept for Backward (older ones: the client resends their inputs)",
    "max_kv_tokens": "rows x positions an inference session's KV cache may hold",
    "max_lora_rank": "LoRA rank of a session's trunk adapter",
    "max_session_memory_mb": "MiB one session may hold (adapter, gradients, optimizer state, saved graphs, "
                             "replies kept for retries, KV cache)",
}


# The metrics options' defaults, for `make run` and compose (unset: no metrics).
METRICS_PORT_ENV, METRICS_HOST_ENV = "TRUNK_METRICS_PORT", "TRUNK_METRICS_HOST"


def read_token(token_file: str | None) -> str:
    return resolve_token(None, token_file)


def layer_range(text: str) -> tuple[int, int]:
    """"8-15" as (8, 15); "8" as (8, 8)."""
    first, _, last = text.strip().partition("-")
    if not first.isdecimal() or not (last or first).isdecimal():
        raise argparse.ArgumentTypeError(f"expected FIRST-LAST block numbers such as 8-15, got {text!r}")
    return int(first), int(last or first)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trunk_server", description=__doc__)
    parser.add_argument("--model", required=True, help="model directory (the same base model as the clients')")
    parser.add_argument("--model-id", help="name reported by Info (default: the directory name)")
    parser.add_argument("--layers", metavar="FIRST-LAST", type=layer_range,
                        help="serve exactly the decoder blocks FIRST to LAST (e.g. 8-15; a link of a chain of "
                             "trunks); instead of --bottom-layers/--top-layers")
    parser.add_argument("--bottom-layers", type=int, help="decoder layers the clients run first (the default cut)")
    parser.add_argument("--top-layers", type=int, help="decoder layers the clients run last (the default cut)")
    parser.add_argument("--min-bottom-layers", type=int,
                        help="fewest layers a session may keep before the trunk (default: --bottom-layers); "
                             "sessions may also keep more")
    parser.add_argument("--min-top-layers", type=int,
                        help="fewest layers a session may keep after the trunk (default: --top-layers)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051, help="0 picks a free port (printed)")
    parser.add_argument("--token-file", help=f"file holding the bearer token (default: ${TOKEN_ENV})")
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument("--device", default="cpu",
                        help=f"where the frozen blocks run: {DEVICES} (default cpu; auto: a GPU when there is one)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                        help="compute dtype of the frozen blocks; LoRA weights and optimizer state stay fp32")
    parser.add_argument("--max-sessions", type=int, default=8)
    parser.add_argument("--session-lease", "--session-ttl", dest="session_lease", type=int,
                        default=TrunkServerConfig.session_lease_s,
                        help="seconds a session lives without a call; each call renews it")
    parser.add_argument("--max-message-mb", type=int, default=8, help="largest single gRPC message")
    metrics = parser.add_argument_group("Prometheus metrics (off by default)")
    metrics.add_argument("--metrics-port", type=int, metavar="PORT",
                         help="serve metrics at http://HOST:PORT/metrics (sessions, requests by RPC and "
                              "status code, latency, tokens, busy time, memory); 0 picks a free port (printed); "
                              f"default: ${METRICS_PORT_ENV}, off when it is unset or empty")
    metrics.add_argument("--metrics-host", default=os.environ.get(METRICS_HOST_ENV) or "127.0.0.1", metavar="HOST",
                         help="address the metrics endpoint listens on (default: %(default)s; it has no "
                              "authentication, so expose it only to your monitoring)")
    budgets = parser.add_argument_group("per-session budgets (a request beyond one is refused)")
    for name, help_text in _BUDGET_HELP.items():
        budgets.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int,
                             default=getattr(SessionBudgets, name), help=f"{help_text} (default: %(default)s)")
    return parser


def metrics_port_from_env() -> int | None:
    """$TRUNK_METRICS_PORT as a port, None when unset or empty (metrics off)."""
    value = os.environ.get(METRICS_PORT_ENV, "").strip()
    if not value:
        return None
    if not value.isdecimal():
        raise ValueError(f"{METRICS_PORT_ENV}={value!r} is not a port number (leave it empty for no metrics)")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    limit_malloc_arenas()  # before gRPC's threads: they compute every session's steps
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = TrunkServerConfig(
            model_dir=Path(args.model), n_bottom=args.bottom_layers, n_top=args.top_layers, layers=args.layers,
            min_bottom=args.min_bottom_layers, min_top=args.min_top_layers,
            token=read_token(args.token_file), host=args.host, port=args.port, tls_cert=args.tls_cert,
            tls_key=args.tls_key, device=args.device, dtype=args.dtype, max_sessions=args.max_sessions,
            session_lease_s=args.session_lease, max_message_bytes=args.max_message_mb << 20,
            metrics_port=args.metrics_port if args.metrics_port is not None else metrics_port_from_env(),
            metrics_host=args.metrics_host,
            budgets=SessionBudgets(**{name: getattr(args, name) for name in _BUDGET_HELP}),
        )
        from .host import TrunkHost
        from .server import create_server

        host = TrunkHost(config, model_id=args.model_id)
        running = create_server(config, host)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = StopSignal()
    served = (f"layers {host.bounds.lowest}-{host.bounds.highest - 1} of {host.num_layers}, sessions run any part "
              "of them" if config.layers else
              f"layers {host.bounds.default.start}-{host.bounds.default.stop - 1} of {host.num_layers} by default, "
              f"sessions may run {host.bounds.lowest}-{host.bounds.highest - 1}")
    print(f"trunk server listening on {config.host}:{running.port} ({served}; model {host.model_id}; "
          f"{host.device}, {config.dtype})"
          + ("" if running.metrics is None else f"; metrics on {running.metrics.url}"),
          flush=True)
    while not stop.wait(1.0):
        pass
    logging.getLogger("trunk_server").info("signal %s: shutting down", stop.received)
    running.stop()
    print("trunk server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
