"""`anomalyd tokens create|list|revoke`: the API tokens the daemon keeps (hashes only) beside `[[api.tokens]]`.

A created token is printed once; the daemon accepts it at once (it rereads the token file when it changes).
Tokens written in the configuration (`[[api.tokens]]`) are listed too, and are changed there, not here.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def _settings(args: argparse.Namespace) -> Any:
    from daemon.commands.context import load_settings

    return load_settings(args)


def cmd_tokens_create(args: argparse.Namespace) -> int:
    from daemon.api.tokens import TokenError, store_for
    from daemon.cli import UsageError
    from daemon.commands.context import current_user

    settings = _settings(args)
    if any(token.name == args.name for token in settings.api.tokens):
        raise RuntimeError(f"a token named {args.name!r} is configured in [[api.tokens]] already")
    try:
        secret, entry = store_for(settings).create(args.name, args.role, created_by=f"cli:{current_user()}")
    except TokenError as exc:
        if "exists already" in str(exc):
            raise RuntimeError(str(exc)) from None
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps({"name": entry.name, "role": entry.role, "token": secret}))
        return 0
    print(f"token {entry.name!r} (role {entry.role}) created; it is shown this once:\n\n    {secret}\n")
    print("Log in to the UI with it, or send it as the header `Authorization: Bearer <token>`.")
    print(f"Only its SHA-256 is kept, in {store_for(settings).path}; a running daemon accepts it at once.")
    return 0


def cmd_tokens_list(args: argparse.Namespace) -> int:
    from daemon.api.tokens import store_for

    settings = _settings(args)
    store = store_for(settings)
    items = [{"name": t.name, "role": t.role, "source": "config [[api.tokens]]", "created_at": None,
              "created_by": None} for t in settings.api.tokens]
    items += [{"name": t.name, "role": t.role, "source": str(store.path), "created_at": t.created_at,
               "created_by": t.created_by} for t in store.tokens()]
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    if not items:
        print(f"(no API tokens: none in [[api.tokens]], none in {store.path}; the daemon's first start creates an "
              "admin token, or run `anomalyd tokens create NAME --role admin`)")
        return 0
    width = max(len(item["name"]) for item in items)
    for item in items:
        made = f"  created {item['created_at']} by {item['created_by']}" if item["created_at"] else ""
        print(f"{item['name']:<{width}}  {item['role']:<8}  {item['source']}{made}")
    return 0


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    from daemon.api.tokens import TokenError, store_for

    settings = _settings(args)
    if any(token.name == args.name for token in settings.api.tokens):
        raise RuntimeError(f"token {args.name!r} is configured in [[api.tokens]]: remove it from the configuration")
    try:
        entry = store_for(settings).revoke(args.name)
    except TokenError as exc:
        raise RuntimeError(str(exc)) from None
    print(f"token {entry.name!r} (role {entry.role}) revoked; a running daemon refuses it from now on")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    tokens = subparsers.add_parser("tokens", help="API tokens: create, list, revoke")
    tokens_sub = tokens.add_subparsers(dest="tokens_command", metavar="ACTION")
    tokens_sub.required = True
    config_help = "configuration file (default: $ANOMALYD_CONFIG, ./config.toml, /etc/anomalyd/config.toml)"
    create = tokens_sub.add_parser("create", help="a new token, printed once")
    create.add_argument("name", metavar="NAME")
    create.add_argument("--role", choices=("viewer", "operator", "admin"), default="viewer",
                        help="viewer: read; operator: also label; admin: also models and retraining (default viewer)")
    create.add_argument("--config", help=config_help)
    create.add_argument("--json", action="store_true")
    create.set_defaults(func=cmd_tokens_create, short_lived=True)
    listing = tokens_sub.add_parser("list", help="configured and stored tokens (never the secrets)")
    listing.add_argument("--config", help=config_help)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_tokens_list, short_lived=True)
    revoke = tokens_sub.add_parser("revoke", help="delete a stored token")
    revoke.add_argument("name", metavar="NAME")
    revoke.add_argument("--config", help=config_help)
    revoke.set_defaults(func=cmd_tokens_revoke, short_lived=True)
