"""Failed log-ins counted per username and per client address in the shared cache (Redis).

After LOGIN_FAILURE_LIMIT failures for one username, or LOGIN_FAILURE_IP_LIMIT from one address,
within LOGIN_LOCKOUT_S seconds of the first, every further attempt is refused until that window
ends, before its password is checked: a right guess during a lockout gains nothing. A successful
log-in clears its username's failures (not its address's: one valid account must not reset the
count of an address that guesses at others). Usernames are counted whether or not they exist, so
the lockout tells nothing about which do.

The counts live in Django's default cache, which every web process shares. When it cannot be
reached the attempt goes through and a warning is logged: a Redis outage must not lock everyone
out, nor break the log-in page.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import time
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache
from django.http import HttpRequest

logger = logging.getLogger(__name__)

KEY_PREFIX = "login-failures"
# A client holds a whole IPv6 /64 as easily as one address: count the network, not each address.
IPV6_PREFIX = 64


@dataclass(frozen=True)
class Lockout:
    message: str
    retry_after_s: int


@dataclass(frozen=True)
class _Scope:
    count_key: str
    since_key: str  # when the window's first failure happened (epoch seconds)
    limit: int
    refusal: str  # the message, with {wait} for how long is left


def _scope(kind: str, value: str, limit: int, refusal: str) -> _Scope:
    # Hashed: any text a visitor types becomes a short key of safe characters.
    digest = hashlib.sha256(value.encode()).hexdigest()[:32]
    key = f"{KEY_PREFIX}:{kind}:{digest}"
    return _Scope(count_key=key, since_key=f"{key}:since", limit=limit, refusal=refusal)


def _username_scope(username: str) -> _Scope:
    # Case-folded: "Ada" and "ada" share one count, whatever the database's collation makes of them.
    return _scope("user", username.strip().casefold(), settings.LOGIN_FAILURE_LIMIT,
                  "Too many failed log-in attempts for this account; try again in {wait}.")


def client_address(request: HttpRequest) -> str:
    """The address the request came from (REMOTE_ADDR: no proxy header is trusted), an IPv6 one as its /64."""
    address = request.META.get("REMOTE_ADDR") or "unknown"
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:  # ::ffff:a.b.c.d is the IPv4 client a.b.c.d
            return str(parsed.ipv4_mapped)
        return str(ipaddress.ip_network(f"{parsed}/{IPV6_PREFIX}", strict=False))
    return str(parsed)


def _address_scope(request: HttpRequest) -> _Scope:
    return _scope("ip", client_address(request), settings.LOGIN_FAILURE_IP_LIMIT,
                  "Too many failed log-in attempts from your network address; try again in {wait}.")


def _wait_words(seconds: int) -> str:
    if seconds < 60:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    minutes = math.ceil(seconds / 60)
    return f"{minutes} minute{'s' if minutes != 1 else ''}"


def lockout(request: HttpRequest, username: str) -> Lockout | None:
    """Why a log-in as ``username`` from this request is refused now, or None when it may be tried."""
    scopes = (_username_scope(username), _address_scope(request))
    try:
        stored = cache.get_many([key for scope in scopes for key in (scope.count_key, scope.since_key)])
    except Exception:  # any backend's failure: the attempt goes through (see the module's docstring)
        logger.warning("log-in throttling is off for this attempt: the cache cannot be read", exc_info=True)
        return None
    now = int(time.time())
    for scope in scopes:
        if stored.get(scope.count_key, 0) >= scope.limit:
            ends = stored.get(scope.since_key, now) + settings.LOGIN_LOCKOUT_S
            left = min(max(1, ends - now), settings.LOGIN_LOCKOUT_S)
            return Lockout(message=scope.refusal.format(wait=_wait_words(left)), retry_after_s=left)
    return None


def record_failure(request: HttpRequest, username: str) -> None:
    """Count a wrong password (or unknown username) against the username and the client's address."""
    window = settings.LOGIN_LOCKOUT_S
    now = int(time.time())
    try:
        for scope in (_username_scope(username), _address_scope(request)):
            # add() only writes a key that is not there: the first failure opens a window of its own.
            cache.add(scope.since_key, now, timeout=window)
            cache.add(scope.count_key, 0, timeout=window)
            try:
                cache.incr(scope.count_key)  # atomic in Redis, and keeps the key's expiry
            except ValueError:  # the window ended between add() and incr()
                cache.set(scope.count_key, 1, timeout=window)
    except Exception:
        logger.warning("a failed log-in was not counted: the cache cannot be written", exc_info=True)


def clear(username: str) -> None:
    """Forget the username's failures (after a successful log-in)."""
    scope = _username_scope(username)
    try:
        cache.delete_many([scope.count_key, scope.since_key])
    except Exception:
        logger.warning("failed log-ins of an account were not cleared: the cache cannot be written", exc_info=True)
