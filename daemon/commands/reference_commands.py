"""`anomalyd references list|add|remove` (a source's normal references; `anomalyd calibrate` is in
daemon/commands/threshold_commands.py).

`references add --source ID INSPECTION_ID...` copies those inspections' frames into the source's reference folder
under server-chosen names (as `POST /api/sources/{id}/references` does); a running daemon notices the new files,
rebuilds that source's bank and swaps it in between two batches.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from daemon.commands.context import (
    config_argument,
    current_user,
    database,
    load_settings,
    store,
    time_window,
    usage,
)


def _source(settings: Any, source_id: str) -> Any:
    try:
        return settings.source(source_id)
    except KeyError:
        raise usage(f"--source {source_id!r}: not a [[sources]] id in the configuration "
                     f"({', '.join(s.id for s in settings.sources) or 'none configured'})") from None


def cmd_references_list(args: argparse.Namespace) -> int:
    from daemon.references import admin as admin
    from daemon.references import files as refs

    settings = load_settings(args)
    _source(settings, args.source)
    with database(settings) as sessions:
        items = admin.list_references(settings, args.source, sessions, store(settings))
    if args.json:
        print(json.dumps({"source": args.source, "folder": str(refs.own_reference_dir(settings, args.source)),
                          "items": items}))
        return 0
    print(f"source {args.source}: {len(items)} reference image(s); added ones go to "
          f"{refs.own_reference_dir(settings, args.source)}")
    for item in items:
        print(f"  {item['name']}  {item['bytes']} bytes  {item['folder']}{'' if item['removable'] else '  (shared)'}")
    return 0


def cmd_references_add(args: argparse.Namespace) -> int:
    from daemon.references import admin as admin

    settings = load_settings(args)
    _source(settings, args.source)
    with database(settings) as sessions:
        try:
            added, warnings = admin.add_references(settings, sessions, store(settings), args.source, args.inspections,
                                                   f"cli:{current_user()}")
        except (LookupError, ValueError) as exc:
            raise usage(str(exc).strip("'\"")) from None
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps({"source": args.source, "added": added, "warnings": warnings}))
        return 0
    for item in added:
        print(f"added {item['name']} (inspection {item['inspection_id']}) to {item['folder']}")
    return 0


def cmd_references_propose(args: argparse.Namespace) -> int:
    from daemon.zero_label.start import propose_references

    settings = load_settings(args)
    _source(settings, args.source)
    args.until = None
    since, _ = time_window(args)  # a drift's start (its `references_proposal`): the frames since then
    with database(settings) as sessions:
        proposal = propose_references(sessions, args.source, args.count or settings.mutual.propose_count,
                                      min_judged=args.after or settings.mutual.propose_after, since=since)
    if args.json:
        print(json.dumps(proposal))
        return 0
    print(f"source {args.source}: {proposal['message']}")
    for frame in proposal["frames"]:
        print(f"  inspection {frame['inspection_id']}  score {frame['score']:.3f}  {frame['frame_name']}")
    if proposal["frames"]:
        ids = " ".join(str(f["inspection_id"]) for f in proposal["frames"])
        print(f"approve: anomalyd references add --source {args.source} {ids}")
    return 0


def cmd_references_remove(args: argparse.Namespace) -> int:
    from daemon.references import admin as admin

    settings = load_settings(args)
    _source(settings, args.source)
    for name in args.names:
        try:
            path = admin.remove_reference(settings, args.source, name, f"cli:{current_user()}")
        except (LookupError, ValueError) as exc:
            raise usage(str(exc).strip("'\"")) from None
        print(f"removed {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("references", help="a source's normal reference images: list, propose, add, "
                                   "remove")
    commands = parser.add_subparsers(dest="references_command", metavar="ACTION")
    commands.required = True
    listing = commands.add_parser("list", help="the reference images of a source")
    config_argument(listing)
    listing.add_argument("--source", required=True, help="the [[sources]] id")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_references_list)
    add = commands.add_parser("add", help="use the frames of inspections as references of their source")
    config_argument(add)
    add.add_argument("--source", required=True, help="the [[sources]] id")
    add.add_argument("inspections", nargs="+", type=int, metavar="INSPECTION_ID")
    add.add_argument("--json", action="store_true")
    add.set_defaults(func=cmd_references_add)
    propose = commands.add_parser("propose", help="known-good candidates of a source that runs mutual scoring "
                                  "(references = \"auto\")")
    config_argument(propose)
    propose.add_argument("--source", required=True, help="the [[sources]] id")
    propose.add_argument("--count", type=int, help="frames proposed (default: [mutual] propose_count, 8)")
    propose.add_argument("--after", type=int,
                         help="judged normal-looking frames needed first (default: [mutual] propose_after, 50)")
    propose.add_argument("--since", help="a drift's start (RFC 3339; its message's started_at): propose among the "
                         "frames since then, those held back during the drift included")
    propose.add_argument("--json", action="store_true")
    propose.set_defaults(func=cmd_references_propose)
    remove = commands.add_parser("remove", help="remove reference images (by the names `list` shows)")
    config_argument(remove)
    remove.add_argument("--source", required=True, help="the [[sources]] id")
    remove.add_argument("names", nargs="+", metavar="NAME")
    remove.set_defaults(func=cmd_references_remove)
