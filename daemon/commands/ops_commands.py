"""Operator commands working directly on the database (no running daemon needed):
`anomalyd defects`, `anomalyd label`, `anomalyd models list|activate`, `anomalyd calibrate` (and `anomalyd retrain`
from `daemon.commands.retrain_commands`).

`calibrate` scores known-good frames of one source with the configured detector and derives that source's
alert threshold (`model.fewshot.calibrate_threshold`: a quantile of the good scores, or their maximum, plus a
margin). The daemon reads per-source thresholds from `[[sources]].threshold` in the configuration, so that is
where the value goes: printed as the TOML line to use, and written into the config file itself with `--write`
(a line edit of that source's table: comments and layout are kept; the file is re-validated afterwards and
restored if the edit did not give the expected value).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.commands.context import (
    config_argument,
    current_user,
    database,
    history_database,
    load_settings,
    print_json,
    store,
    time_window,
    usage,
)

if TYPE_CHECKING:


    pass


# --- defects -----------------------------------------------------------------------------------------------------


def cmd_defects(args: argparse.Namespace) -> int:
    after, before = time_window(args)
    if args.limit < 1 or args.limit > 1000:
        raise usage(f"--limit must be between 1 and 1000, not {args.limit}")
    with history_database(args) as sessions, sessions() as session:
        from adapters.db import InspectionFilter, history  # SQLAlchemy: only once there is a database

        filters = InspectionFilter(source=args.source, line=args.line, after=after, before=before,
                                   min_score=args.min_score, anomalous=None if args.all else True, label=args.label)
        page = history.list_page(session, filters, sort=args.sort, limit=args.limit)
        items = [history.inspection_dict(row, page.labels.get(row.id)) for row in page.rows]
    if args.json:
        print_json(items)
        return 0
    _print_table(items)
    return 0


def _print_table(items: list[dict[str, Any]]) -> None:
    headers = ("id", "captured_at", "source", "line", "score", "threshold", "anomalous", "label", "regions")
    rows = [(str(item["id"]), (item["captured_at"] or "")[:19].replace("T", " "), item["source"], item["line"],
             "-" if item["score"] is None else f"{item['score']:.3f}", f"{item['threshold']:.3f}",
             {True: "yes", False: "no"}.get(item["is_anomalous"], "no decision"), (item["label"] or {}).get("label", "-"),
             str(len(item["regions"]))) for item in items]
    widths = [max(len(header), *(len(row[i]) for row in rows)) if rows else len(header)
              for i, header in enumerate(headers)]
    print("  ".join(header.ljust(width) for header, width in zip(headers, widths, strict=True)).rstrip())
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    if not rows:
        print("(no inspections match)")


# --- label -------------------------------------------------------------------------------------------------------


def cmd_label(args: argparse.Namespace) -> int:
    mask = None
    if args.mask:
        try:
            mask = Path(args.mask).read_bytes()
        except OSError as exc:
            raise usage(f"--mask {args.mask}: cannot read: {exc.strerror or exc}") from None
    author = args.author or f"cli:{current_user()}"
    with history_database(args) as sessions:
        from adapters.db import history  # SQLAlchemy: only once there is a database

        artifacts = store(load_settings(args)) if mask is not None else None  # a label mask is kept with them
        try:
            row = history.apply_label(sessions, artifacts, args.inspection_id,
                                      args.label, author=author, mask=mask, mask_name=f"--mask {args.mask}")
        except history.NotFound as exc:  # a runtime failure (exit 1), not a usage error
            raise RuntimeError(str(exc)) from None
        except history.HistoryError as exc:
            raise usage(str(exc)) from None
    extra = f" with mask {row.mask_path}" if row.mask_path else ""
    print(f"inspection {args.inspection_id} labelled {row.label} by {author}{extra} (label id {row.id})")
    return 0


# --- models ------------------------------------------------------------------------------------------------------


def cmd_models_list(args: argparse.Namespace) -> int:
    with history_database(args) as sessions, sessions() as session:
        from adapters.db import history  # SQLAlchemy: only once there is a database
        from daemon.learning.runs import recent_runs

        items = [history.model_dict(row) for row in history.list_versions(session)]
        runs = recent_runs(session, limit=5)
    if args.json:
        print_json(items)
        return 0
    if not items:
        print("(no model versions recorded)")
    for item in items:
        metrics = ", ".join(f"{key}={value:.4g}" if isinstance(value, int | float) else f"{key}={value}"
                            for key, value in sorted((item["metrics"] or {}).items())
                            if not isinstance(value, dict | list))
        print(f"{item['version']:<32} {item['status']:<9} {item['kind']:<11} {(item['created_at'] or '')[:19]}  "
              f"{metrics}".rstrip())
    if runs:  # a failed run registers no version: its reason shows here
        print("recent retraining runs:")
        for run in runs:
            candidate = f" candidate {run['candidate_version']}" if run["candidate_version"] else ""
            promoted = " (promoted)" if run["promoted"] else ""
            print(f"  run #{run['id']} {run['status']:<9} {str(run['started_at'] or '')[:19]}{candidate}{promoted}"
                  f"{': ' + run['reason'] if run['reason'] else ''}")
    return 0


def cmd_models_activate(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    from daemon.learning.versions import UnknownVersionError, VersionRegistry

    with database(settings, args.config) as sessions:
        try:
            VersionRegistry(sessions).activate(args.version)
        except UnknownVersionError as exc:
            raise usage(str(exc)) from None
    print(f"model version {args.version} is now active (running daemons switch to it within their model watcher's poll interval)")
    return 0


# --- calibrate ---------------------------------------------------------------------------------------------------


# --- registration ------------------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    defects = subparsers.add_parser("defects", help="query the inspection history (anomalous ones by default)")
    config_argument(defects)
    defects.add_argument("--source", help="only this source id")
    defects.add_argument("--line", help="only this production line")
    defects.add_argument("--since", help="captured at or after: ISO time (UTC if no offset) or a duration (24h, 7d)")
    defects.add_argument("--until", help="captured before: ISO time or a duration ago")
    defects.add_argument("--min-score", type=float, help="only scores >= this")
    defects.add_argument("--label", choices=("normal", "anomalous", "none"), help="latest operator label (none = unlabelled)")
    defects.add_argument("--all", action="store_true", help="include inspections not flagged anomalous")
    defects.add_argument("--sort", choices=("time_desc", "time_asc", "score_desc", "score_asc"), default="time_desc")
    defects.add_argument("--limit", type=int, default=50, help="at most this many rows (default 50, max 1000)")
    defects.add_argument("--json", action="store_true", help="JSON list instead of a table")
    defects.set_defaults(func=cmd_defects, short_lived=True)

    label = subparsers.add_parser("label", help="record operator feedback on an inspection (used by retraining)")
    config_argument(label)
    label.add_argument("inspection_id", type=int, metavar="INSPECTION_ID")
    label.add_argument("label", choices=("normal", "anomalous"))
    label.add_argument("--mask", metavar="FILE", help="defect mask: PNG, BMP or TIFF of the frame's size, "
                       "non-zero = defect")
    label.add_argument("--author", help="who labels (default cli:<user>)")
    label.set_defaults(func=cmd_label, short_lived=True)

    models = subparsers.add_parser("models", help="model versions")
    models_sub = models.add_subparsers(dest="models_command", metavar="ACTION")
    models_sub.required = True
    listing = models_sub.add_parser("list", help="versions with status and metrics")
    config_argument(listing)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_models_list, short_lived=True)
    activate = models_sub.add_parser("activate", help="make VERSION the active model")
    config_argument(activate)
    activate.add_argument("version", metavar="VERSION")
    activate.set_defaults(func=cmd_models_activate, short_lived=True)
