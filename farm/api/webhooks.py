"""Webhooks: where they may go, how they are signed, what they carry.

Where: http or https only, and every address the host resolves to must be public (not
loopback, private, link-local, multicast, reserved or unspecified, IPv4 or IPv6, mapped
addresses included) unless the operator sets `FARM_WEBHOOK_ALLOW_PRIVATE=1`. The check runs at
submit (a refused URL is a 422, nothing written) and again before every attempt, so a name
that later resolves to an internal address is refused then too (`check_url`).

Signature (the receiver checks it with its tenant's secret, `farm tokens secret TENANT`):

    X-Farm-Signature: t=1718000000,v1=<hex HMAC-SHA256(secret, f"{t}.{body}")>
    X-Farm-Event-Id: evt_<hex>          stable: the same for every attempt at one event

    >>> expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    >>> hmac.compare_digest(expected, v1) and abs(time.time() - t) < 300

Deliveries are at least once: a receiver deduplicates by the event id.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
import time
from urllib.parse import urlsplit

from farm.errors import InvalidJob

SIGNATURE_HEADER = "X-Farm-Signature"
EVENT_HEADER = "X-Farm-Event-Id"


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check_url(url: str, allow_private: bool, field: str = "webhook") -> list[str]:
    """The addresses `url`'s host resolves to, or `InvalidJob` naming the field and the URL:
    not http(s), no host, unresolvable, or (unless `allow_private`) any address not public."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidJob(f"{field}: must be an http:// or https:// URL, got {url!r}", field=field)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise InvalidJob(f"{field}: cannot resolve {parts.hostname!r} ({e})", field=field) from None
    addresses = sorted({str(info[4][0]) for info in infos})
    if not allow_private:
        bad = [a for a in addresses if not _public(a)]
        if bad:
            raise InvalidJob(
                f"{field}: {url!r} resolves to {', '.join(bad)}, not a public address "
                "(FARM_WEBHOOK_ALLOW_PRIVATE=1 allows it)",
                field=field,
            )
    return addresses


def sign(secret: str, body: bytes, now: float | None = None) -> str:
    """The `X-Farm-Signature` value of `body`, timestamped `now`."""
    t = int(now if now is not None else time.time())
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: str, body: bytes, header: str, tolerance: float = 300.0) -> bool:
    """Whether `header` signs `body` with `secret`, within `tolerance` seconds of now."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        t = int(fields["t"])
    except (KeyError, ValueError):
        return False
    want = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, fields.get("v1", "")) and abs(time.time() - t) <= tolerance


def event_id(delivery: str, what: str) -> str:
    """The stable id of the event a delivery carries."""
    return "evt_" + hashlib.sha256(f"{delivery}:{what}".encode()).hexdigest()[:32]


def backoff(attempt: int, first: float, cap: float) -> float:
    """Seconds to wait after attempt `attempt` (1, 2, …) failed: first, 2·first, … up to cap."""
    return min(cap, first * 2 ** max(0, attempt - 1))
