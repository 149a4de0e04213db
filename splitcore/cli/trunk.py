"""Command-line options for reaching a trunk server, shared by ``train`` and ``generate``."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from splitcore.remote.client import TrunkClient

TOKEN_ENV = "TRUNK_TOKEN"
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


def add_trunk_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trunk", metavar="HOST:PORT", help="address of the trunk server")
    parser.add_argument("--token", help=f"the trunk's bearer token (prefer --token-file or ${TOKEN_ENV}: "
                                        "a command line is visible to other users of the machine)")
    parser.add_argument("--token-file", help="file holding the trunk's bearer token")
    parser.add_argument("--tls-ca", type=Path, help="CA certificate (PEM) of a trunk that uses TLS")


def resolve_token(token: str | None, token_file: str | None, how: str = "--token-file FILE") -> str:
    """The bearer token: given directly, from a file, or from $TRUNK_TOKEN; ValueError says how to pass one."""
    if token:
        return token.strip()
    if token_file:
        try:
            return Path(token_file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read --token-file {token_file}: {exc.strerror}") from exc
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise ValueError(f"no token: pass {how} or set {TOKEN_ENV}")
    return token


def trunk_token(args: argparse.Namespace) -> str:
    return resolve_token(args.token, args.token_file, how="--token, --token-file FILE")


def connect_trunk(args: argparse.Namespace, wire_encoding: str = "fp32") -> TrunkClient:
    match = _ADDRESS.match(args.trunk or "")
    if not match or not 1 <= int(match.group(2)) <= 65535:
        raise ValueError(f"--trunk must be HOST:PORT (e.g. 127.0.0.1:50051), got {args.trunk!r}")
    root_certificates = None
    if args.tls_ca is not None:
        try:
            root_certificates = args.tls_ca.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read --tls-ca {args.tls_ca}: {exc.strerror}") from exc
    return TrunkClient(args.trunk, trunk_token(args), wire_encoding=wire_encoding,
                       root_certificates=root_certificates)
