"""Command-line options for reaching a trunk server or a chain of them, shared by ``train`` and ``generate``.

``--trunk HOST:PORT`` names one trunk; ``--trunk A:1,B:2,C:3`` a chain of trunks, in block order
(the first link receives the Bottom's output, the last one hands its output to the Top).
``--token-file`` and ``--tls-ca`` then take one value for every link, or one per link,
comma-separated in the same order (``--tls-ca none`` or an empty entry: that link is plaintext).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from splitcore.remote.client import TrunkClient

TOKEN_ENV = "TRUNK_TOKEN"
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


def add_trunk_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trunk", metavar="HOST:PORT[,HOST:PORT...]",
                        help="address of the trunk server, or of each link of a chain of trunks in block order")
    parser.add_argument("--token", help=f"the trunk's bearer token (prefer --token-file or ${TOKEN_ENV}: "
                                        "a command line is visible to other users of the machine)")
    parser.add_argument("--token-file", metavar="FILE[,FILE...]",
                        help="file holding the trunk's bearer token; for a chain, one for every link or one per "
                             "link, comma-separated")
    parser.add_argument("--tls-ca", metavar="PEM[,PEM...]",
                        help="CA certificate (PEM) of a trunk that uses TLS; for a chain, one for every link or one "
                             "per link (none: that link is plaintext)")


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


def _per_link(option: str, value: str | None, links: int) -> list[str | None]:
    """An option's value for each link: one value for all, or one per link, comma-separated."""
    if value is None:
        return [None] * links
    values = [part.strip() for part in str(value).split(",")] if links > 1 else [str(value).strip()]
    if len(values) == 1:
        return values * links
    if len(values) != links:
        raise ValueError(f"{option} has {len(values)} values for a chain of {links} trunks: give one for every "
                         "link or one per link, comma-separated in the order of --trunk")
    return values


def _root_certificates(path: str | None) -> bytes | None:
    if not path or path.lower() == "none":
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read --tls-ca {path}: {exc.strerror}") from exc


def trunk_addresses(value: str | None) -> list[str]:
    """The HOST:PORT of each link of ``--trunk`` (ValueError naming the bad one)."""
    addresses = [part.strip() for part in (value or "").split(",")]
    for address in addresses:
        match = _ADDRESS.match(address)
        if not match or not 1 <= int(match.group(2)) <= 65535:
            example = "HOST:PORT (e.g. 127.0.0.1:50051), or HOST:PORT,HOST:PORT,... for a chain of trunks"
            raise ValueError(f"--trunk must be {example}; got {address!r}"
                             + (f" in {value!r}" if len(addresses) > 1 else ""))
    if len(set(addresses)) != len(addresses):
        raise ValueError(f"--trunk names a trunk twice ({value!r}): each link of a chain is its own server")
    return addresses


def connect_trunks(args: argparse.Namespace, wire_encoding: str = "fp32") -> TrunkClients:
    """One client per link of ``--trunk`` (one for a plain trunk), with each link's token and TLS setting."""
    addresses = trunk_addresses(args.trunk)
    token_files = _per_link("--token-file", args.token_file, len(addresses))
    certificates = [_root_certificates(path) for path in _per_link("--tls-ca", args.tls_ca, len(addresses))]
    return TrunkClients(TrunkClient(address, resolve_token(args.token, token_file, how="--token, --token-file FILE"),
                        wire_encoding=wire_encoding, root_certificates=root)
            for address, token_file, root in zip(addresses, token_files, certificates, strict=True))


class TrunkClients(list):
    """The clients of a chain, closed together (``with connect_trunks(...) as clients`` reads as one)."""

    def __enter__(self) -> TrunkClients:
        return self

    def __exit__(self, *exc) -> None:
        for client in self:
            client.__exit__(*exc)
