"""`anomalyd geometry show|history|set|reset` (issue 20): a source's frame geometry (`resize`, `roi`,
`ignore_polygons`, `tile_overlap`, `tile_size`) from the command line, as the API's `/api/sources/{id}/geometry` and the UI's
Geometry tab set it.

Like the other operator commands (`references add`, `thresholds pin`), these work on the configuration's storage
folder and database, which the running daemon shares: `set` and `reset` write `<[storage].dir>/geometry/<source>.json`
with who changed it (`cli:<user>`) and a line of its `history.jsonl` (daemon/references/geometry_overrides.py), and announce
the change through the outbox (retained MQTT `<prefix>/<line>/<source>/geometry`, webhook event `geometry`;
daemon/references/geometry_events.py). The daemon notices the file at its next reference poll (seconds), rebuilds the source's
bank through the new geometry and recalibrates. The values are checked as the API checks them: a degenerate ROI or
polygon, one outside the source's newest frame, or a geometry the model cannot run is a usage error, nothing saved.

With `--api URL` they go to a running daemon's HTTP API instead (`/api/sources/{id}/geometry`,
from another host too), with the operator token in `$ANOMALYD_TOKEN` or `--token-file` (never on the command line,
where `ps` shows it); the change is then recorded as `api:<token name>` and announced by the daemon.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from daemon.commands.context import config_argument, current_user, database, load_settings, usage
from daemon.commands.geometry_options import parse_polygon, parse_roi


def _source(settings: Any, source_id: str) -> str:
    if not any(cfg.id == source_id for cfg in settings.sources):
        raise usage(f"--source {source_id!r}: not a [[sources]] id in the configuration "
                    f"({', '.join(s.id for s in settings.sources) or 'none configured'})")
    return source_id


def _roi(text: str) -> list[int]:
    """--roi X,Y,W,H, or `full` for the whole frame (no ROI: an empty list here)."""
    return [] if text.strip().lower() in ("full", "none") else parse_roi(text)


def _polygon(text: str) -> list[list[float]]:
    """--ignore 'X,Y X,Y X,Y' (points apart by spaces or semicolons)."""
    try:
        return parse_polygon(";".join(text.replace(";", " ").split()))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected at least 3 points 'X,Y X,Y X,Y'") from None


def frame_hw(settings: Any, sessions: Any, source_id: str) -> tuple[int, int] | None:
    """(height, width) a geometry is checked against, as the API's: the source's newest inspected frame, else its
    first reference image; None when neither is known."""
    from sqlalchemy import select

    from adapters.db import Inspection
    from daemon.references.files import ReferenceSetupError, image_shape, reference_files

    with sessions() as session:
        row = session.execute(
            select(Inspection.width, Inspection.height)
            .where(Inspection.source == source_id, Inspection.width.is_not(None), Inspection.height.is_not(None))
            .order_by(Inspection.id.desc()).limit(1)).first()
    if row is not None:
        return int(row.height), int(row.width)
    try:
        files, _ = reference_files(settings, source_id)
        images = [f for f in files if f.suffix != ".safetensors"]
        return image_shape(images[0], source_id)[:2] if images else None
    except ReferenceSetupError:
        return None


def _describe(values: dict[str, Any]) -> str:
    roi = values.get("roi")
    polygons = values.get("ignore_polygons") or []
    return (f"resize {values['resize']}, roi {'x,y,w,h = ' + ','.join(map(str, roi)) if roi else 'the whole frame'}, "
            f"{len(polygons)} ignore polygon(s), tile_overlap {values['tile_overlap']:g}"
            + (f", tile_size {values['tile_size']} px" if values.get("tile_size") else ""))


def _print_summary(shown: dict[str, Any]) -> None:
    print(f"source {shown['source']}: {_describe(shown['geometry'])}")
    for key, origin in shown["origins"].items():
        value = shown["geometry"][key]
        print(f"  {key} = {json.dumps(value)}  ({origin})")
    override = shown["override"]
    if override is not None:
        print(f"  override {shown['override_file']}: set by {override['set_by']} at {override['set_at']}")


def cmd_geometry(args: argparse.Namespace) -> int:
    from daemon.references import geometry_overrides as overrides
    from model.geometry import GeometryError

    if args.api:
        return _through_api(args, args.api.rstrip("/"))
    settings = load_settings(args)
    action = args.geometry_command
    if action == "show":
        ids = [_source(settings, args.source)] if args.source else [cfg.id for cfg in settings.sources]
        try:
            shown = [overrides.summary(settings, source_id) for source_id in ids]
        except GeometryError as exc:
            raise usage(str(exc)) from None
        if args.json:
            print(json.dumps({"items": shown}))
        else:
            for item in shown:
                _print_summary(item)
        return 0
    source_id = _source(settings, args.source)
    if action == "history":
        items = overrides.history(settings, source_id, limit=args.limit)
        if args.json:
            print(json.dumps({"source": source_id, "items": items}))
            return 0
        for event in items:
            print(f"{event['set_at']}  {event['action']} by {event['set_by']}: {json.dumps(event.get('after'))} "
                  f"(was {json.dumps(event.get('before'))})")
        return 0
    return _change(args, settings, source_id)


def _changes(args: argparse.Namespace) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if args.resize is not None:
        changes["resize"] = args.resize
    if args.roi is not None:
        changes["roi"] = args.roi or None
    if args.no_ignore and args.ignore:
        raise usage("--no-ignore and --ignore contradict each other: give one")
    if args.no_ignore:
        changes["ignore_polygons"] = []
    elif args.ignore:
        changes["ignore_polygons"] = args.ignore
    if args.tile_overlap is not None:
        changes["tile_overlap"] = args.tile_overlap
    if args.tile_size is not None:  # 0: back to native resolution
        changes["tile_size"] = args.tile_size or None
    if not changes:
        raise usage("nothing to set: give --resize, --roi, --ignore (or --no-ignore), --tile-overlap or --tile-size")
    return changes


def _change(args: argparse.Namespace, settings: Any, source_id: str) -> int:
    from daemon.references import geometry_events
    from daemon.references import geometry_overrides as overrides
    from model.geometry import GeometryError

    set_by = f"cli:{current_user()}"
    changes = _changes(args) if args.geometry_command == "set" else {}
    with database(settings, args.config) as sessions:  # the announcement goes through the daemon's outbox
        try:
            if args.geometry_command == "set":
                overrides.check_override(settings, source_id, changes, frame_hw(settings, sessions, source_id))
                event = overrides.save_override(settings, source_id, changes, set_by=set_by)
            else:
                event = overrides.clear_override(settings, source_id, set_by=set_by)
        except GeometryError as exc:
            raise usage(f"source {source_id}: {exc}") from None
        except LookupError as exc:
            raise usage(str(exc).strip("'\"")) from None
        announced = geometry_events.announce(sessions, settings, event)
    if args.json:
        print(json.dumps({"change": event, "announced": announced is not None,
                          "summary": overrides.summary(settings, source_id)}))
        return 0
    verb = "set" if args.geometry_command == "set" else "reset to the configuration"
    print(f"source {source_id}: geometry {verb} by {set_by}: {_describe(event['after'])}")
    print("a running daemon rebuilds the source's bank through it and recalibrates within seconds"
          + ("" if announced else "; WARNING: the change could not be announced (see the log above)"))
    return 0


def _token(args: argparse.Namespace) -> str:
    if args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise usage(f"--token-file {args.token_file}: {exc.strerror or exc}") from None
    else:
        token = os.environ.get("ANOMALYD_TOKEN", "").strip()
    if not token:
        raise usage("--api needs an API token (operator for set/reset): put it in $ANOMALYD_TOKEN or a file given "
                    "with --token-file")
    return token


def _through_api(args: argparse.Namespace, base: str) -> int:
    """The same actions on a running daemon's HTTP API; its refusals (4xx) are usage errors with its reason."""
    import httpx

    action = args.geometry_command
    if action == "show" and not args.source:
        method, path, body = "GET", "/api/geometry", None
    elif action == "show":
        method, path, body = "GET", f"/api/sources/{args.source}/geometry", None
    elif action == "history":
        method, path, body = "GET", f"/api/sources/{args.source}/geometry/history?limit={args.limit}", None
    elif action == "set":
        method, path, body = "PUT", f"/api/sources/{args.source}/geometry", _changes(args)
    else:
        method, path, body = "DELETE", f"/api/sources/{args.source}/geometry", None
    try:
        response = httpx.request(method, base + path, json=body, timeout=30,
                                 headers={"Authorization": f"Bearer {_token(args)}"})
    except httpx.HTTPError as exc:
        raise RuntimeError(f"cannot reach the daemon's API at {base}: {exc}") from None
    try:
        answer = response.json()
    except ValueError:
        answer = {"detail": response.text[:200]}
    if response.status_code >= 400:
        detail = answer.get("detail") if isinstance(answer, dict) else answer
        reason = detail if isinstance(detail, str) else json.dumps(detail)
        if response.status_code >= 500:
            raise RuntimeError(f"{base}: {response.status_code}: {reason}")
        raise usage(f"{base}: {response.status_code}: {reason}")
    if action in ("set", "reset"):
        change = answer.pop("change")
        answer = {"change": change, "announced": answer.pop("announced", None), "summary": answer}
    if args.json:
        print(json.dumps(answer))
    elif action in ("set", "reset"):
        print(f"source {args.source}: geometry {action} by {answer['change']['set_by']} through {base}: "
              f"{_describe(answer['change']['after'])}")
    elif action == "history":
        for event in answer["items"]:
            print(f"{event['set_at']}  {event['action']} by {event['set_by']}: {json.dumps(event.get('after'))}")
    elif args.source:
        _print_summary(answer)
    else:
        for item in answer["items"]:
            print(f"source {item['source']}: {_describe(item['geometry']) if 'geometry' in item else item['error']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from model.geometry import RESIZE_MODES

    parser = subparsers.add_parser("geometry", help="a source's frame geometry (ROI, ignore polygons, resize): "
                                   "show, history, set, reset")
    commands = parser.add_subparsers(dest="geometry_command", metavar="ACTION")
    commands.required = True
    for name, text in (("show", "the geometry each source runs with and where each value comes from"),
                       ("history", "every change of a source's geometry, newest first"),
                       ("set", "set keys of a source's geometry (a key not given keeps its value)"),
                       ("reset", "drop the source's override: back to the configuration")):
        sub = commands.add_parser(name, help=text)
        config_argument(sub)
        sub.add_argument("--source", required=name != "show", help="the [[sources]] id")
        sub.add_argument("--json", action="store_true")
        sub.add_argument("--api", metavar="URL", help="a running daemon's HTTP API (e.g. http://line-pc:8080): "
                         "act through it, with the token in $ANOMALYD_TOKEN or --token-file")
        sub.add_argument("--token-file", metavar="FILE", help="with --api: a file holding the API token")
        if name == "history":
            sub.add_argument("--limit", type=int, default=50)
        if name == "set":
            sub.add_argument("--resize", choices=RESIZE_MODES)
            sub.add_argument("--roi", type=_roi, metavar="X,Y,W,H", help="inspect only this rectangle of the frame, in frame "
                             "pixels; `full`: the whole frame")
            sub.add_argument("--ignore", type=_polygon, action="append", metavar="'X,Y X,Y X,Y ...'",
                             help="a polygon of pixels never inspected (repeatable; replaces the source's ignore "
                             "polygons)")
            sub.add_argument("--no-ignore", action="store_true", help="no ignore polygons")
            sub.add_argument("--tile-overlap", type=float, help="fraction of a tile its neighbours overlap")
            sub.add_argument("--tile-size", type=int, metavar="PIXELS", help="frame pixels each tile covers; 0: "
                             "native resolution (the model's input size)")
        sub.set_defaults(func=cmd_geometry)
