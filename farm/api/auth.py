"""Who is calling: bearer tokens, scopes, tenants, and the dashboard's session cookie.

Every route but `/healthz`, `/readyz`, `/openapi.json` and the login page needs
`Authorization: Bearer farm_<id>_<secret>` (`farm tokens create`). The token is looked up in
Redis on every request (`Tenants.authenticate`: its secret compared in constant time), so a
revoked token is refused by the next request; it is never logged (uvicorn's access log shows
paths, never headers).

The dashboard's pages send no header: its login form takes a token once and sets a session
cookie (`farm_session`: the token's id, an expiry, an HMAC of both under the farm's session key,
HttpOnly, SameSite=Strict). A cookie gives read scope only, on GET routes only, and is checked
against Redis too: revoking the token ends its sessions.

`farm dashboard` serves the same app with an operator principal for requests without
credentials (read scope, every tenant): it binds loopback and is run by someone who holds the
farm's Redis URL anyway.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from fastapi import Request

from farm.api.errors import ApiError
from farm.state.tenants import Token

SESSION_COOKIE = "farm_session"


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller: its tenant (None: every tenant, the operator's dashboard) and scopes."""

    tenant: str | None
    scopes: frozenset[str]
    token: str | None = None
    """The token id (None for the operator's dashboard)."""

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes

    def sees(self, tenant: str | None) -> bool:
        """Whether a thing of `tenant` is this caller's to see."""
        return self.tenant is None or tenant == self.tenant

    @classmethod
    def of(cls, token: Token) -> Principal:
        return cls(token.tenant, frozenset(token.scopes), token.id)


OPERATOR = Principal(None, frozenset({"read"}))
"""`farm dashboard`'s caller without credentials: read scope over every tenant."""


def unauthorized(detail: str) -> ApiError:
    return ApiError(401, detail, headers={"WWW-Authenticate": 'Bearer realm="farm"'})


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise unauthorized("Authorization: expected 'Bearer <token>'")
    return value.strip()


def session_value(token_id: str, key: bytes, seconds: int) -> str:
    until = int(time.time()) + seconds
    mac = hmac.new(key, f"{token_id}.{until}".encode(), hashlib.sha256).hexdigest()
    return f"{token_id}.{until}.{mac}"


def session_token_id(value: str, key: bytes) -> str | None:
    """The token id a session cookie carries, if its MAC is good and it has not expired."""
    parts = value.split(".")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    token_id, until, mac = parts
    want = hmac.new(key, f"{token_id}.{until}".encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(mac, want) or int(until) < time.time():
        return None
    return token_id


def new_session_key() -> bytes:
    return secrets.token_bytes(32)


def authenticate(request: Request) -> Principal:
    """The caller of `request`, or 401."""
    ctx = request.app.state.ctx
    token = _bearer(request)
    if token is not None:
        found = ctx.farm.tracker.tenants.authenticate(token)
        if found is None:
            raise unauthorized("token: not a valid token (unknown, revoked or mistyped)")
        return Principal.of(found)
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie and request.method in ("GET", "HEAD"):
        token_id = session_token_id(cookie, ctx.session_key)
        if token_id is not None:
            entry = ctx.farm.tracker.tenants.token(token_id)
            if entry is not None:
                return Principal(entry.tenant, frozenset({"read"}) & _read(entry), entry.id)
    if ctx.anonymous is not None:
        return ctx.anonymous
    raise unauthorized("Authorization: a bearer token is required (`farm tokens create`)")


def _read(token: Token) -> frozenset[str]:
    return frozenset({"read"}) if token.allows("read") else frozenset()


def require(request: Request, scope: str) -> Principal:
    """The caller, if it has `scope`; else 401 or 403."""
    who = authenticate(request)
    if not who.allows(scope):
        raise ApiError(403, f"token: this token lacks the {scope!r} scope", field="scope")
    return who
