"""`farm tokens ...`: the HTTP API's tokens and tenants.

    farm tokens create NAME --tenant T [--scopes submit,read]   the token, printed once
    farm tokens list                                           names, tenants, scopes, ids
    farm tokens revoke NAME|ID                                 refused by the next request
    farm tokens limits TENANT [--max-queued N] [--jobs-per-minute N] [--max-images N]
    farm tokens secret TENANT                                  its webhook signing secret

Redis keeps a token's id and the sha256 of its secret, never the token (`farm.state.tenants`).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from farm.errors import EXIT_FAILED
from farm.state.tenants import DEFAULT_TENANT, LIMITS, Limits


def add_parser(sub: Any) -> None:
    t = sub.add_parser("tokens", help="the HTTP API's tokens and tenants")
    tsub = t.add_subparsers(dest="tokens_command", required=True, metavar="ACTION")
    c = tsub.add_parser("create", help="make a token (printed once)")
    c.add_argument("name")
    c.add_argument(
        "--tenant", default=DEFAULT_TENANT, help=f"its tenant (default {DEFAULT_TENANT})"
    )
    c.add_argument(
        "--scopes", default="submit,read", help="read, submit, admin (default submit,read)"
    )
    c.add_argument("--json", action="store_true")
    ls = tsub.add_parser("list", help="the tokens (never their secrets)")
    ls.add_argument("--json", action="store_true")
    r = tsub.add_parser("revoke", help="delete a token by name or id")
    r.add_argument("token", metavar="NAME|ID")
    lim = tsub.add_parser("limits", help="show or set a tenant's limits (0: none)")
    lim.add_argument("tenant")
    for name in LIMITS:
        lim.add_argument(f"--{name.replace('_', '-')}", type=int, metavar="N")
    lim.add_argument("--clear", action="store_true", help="back to the FARM_API_* defaults")
    s = tsub.add_parser("secret", help="a tenant's webhook signing secret")
    s.add_argument("tenant")


def _tracker() -> Any:
    from farm.client import Farm
    from farm.settings import FarmSettings

    return Farm(FarmSettings(api_url=None)).tracker


def run(args: argparse.Namespace) -> int:
    tenants = _tracker().tenants
    action = args.tokens_command
    if action == "create":
        token, secret = tenants.create_token(args.name, args.tenant, args.scopes.split(","))
        if args.json:
            print(
                json.dumps(
                    {
                        "token": secret,
                        "id": token.id,
                        "tenant": token.tenant,
                        "scopes": list(token.scopes),
                    }
                )
            )
        else:
            print(secret)
            print(
                f"farm tokens: {token.name} ({token.id}) for tenant {token.tenant}, scopes "
                f"{','.join(token.scopes)}: shown once, Redis keeps only its hash"
            )
        return 0
    if action == "list":
        rows = tenants.tokens()
        if args.json:
            print(
                json.dumps(
                    [
                        {
                            "id": t.id,
                            "name": t.name,
                            "tenant": t.tenant,
                            "scopes": list(t.scopes),
                            "created_at": t.created_at,
                        }
                        for t in rows
                    ]
                )
            )
            return 0
        print(f"{'NAME':<20} {'TENANT':<16} {'SCOPES':<20} {'ID':<12} CREATED")
        for t in rows:
            made = time.strftime("%Y-%m-%d %H:%M", time.localtime(t.created_at))
            print(f"{t.name:<20} {t.tenant:<16} {','.join(t.scopes):<20} {t.id:<12} {made}")
        return 0
    if action == "revoke":
        gone = tenants.revoke(args.token)
        if not gone:
            print(f"farm: no token named {args.token!r}")
            return EXIT_FAILED
        for t in gone:
            print(f"revoked {t.name} ({t.id}) of tenant {t.tenant}")
        return 0
    if action == "limits":
        given = {n: getattr(args, n) for n in LIMITS if getattr(args, n) is not None}
        if args.clear:
            tenants.set_limits(args.tenant, **dict.fromkeys(LIMITS))
        if given:
            tenants.set_limits(args.tenant, **given)
        from farm.settings import FarmSettings

        s = FarmSettings()
        now = tenants.limits(
            args.tenant, Limits(s.api_max_queued, s.api_jobs_per_minute, s.api_max_images)
        )
        print("  ".join(f"{n} {getattr(now, n) or 'none'}" for n in LIMITS))
        return 0
    print(tenants.webhook_secret(args.tenant))
    return 0
