"""`anomalyd stats`: inspected, anomalous (defect rate), scores and rejected frames per line or source in time
buckets, from the database directly. The same query as the dashboard's `GET /api/stats/series`
(`adapters.db.history.series`); no torch, no running daemon needed."""

from __future__ import annotations

import argparse
from typing import Any

from daemon.commands.context import config_argument, history_database, print_json, time_window, usage


def cmd_stats(args: argparse.Namespace) -> int:
    from adapters.timeutil import duration_seconds

    after, before = time_window(args)
    seconds = duration_seconds(args.bucket) if not args.bucket.isdigit() else float(args.bucket)
    if seconds is None or seconds != int(seconds):
        raise usage(f"--bucket {args.bucket!r}: expected seconds or a duration like 15m, 1h, 1d")
    with history_database(args) as sessions, sessions() as session:
        from adapters.db import history  # SQLAlchemy: only once there is a database

        try:
            data = history.series(session, after=after, before=before, bucket_s=int(seconds), by=args.by)
        except history.HistoryError as exc:
            raise usage(str(exc)) from None
    if args.json:
        print_json(data)
        return 0
    _print_series(data)
    return 0


def _print_series(data: dict[str, Any]) -> None:
    headers = (data["by"], "bucket (UTC)", "inspected", "anomalous", "rate", "mean score", "max score", "rejected")
    rows = []
    for group in data["groups"]:
        for point in group["points"]:
            rows.append((group["key"], point["t"][:16].replace("T", " "), str(point["inspections"]),
                         str(point["anomalous"]), f"{100 * point['defect_rate']:.1f}%", _score(point["mean_score"]),
                         _score(point["max_score"]), str(point["rejected"])))
    widths = [max(len(header), *(len(row[i]) for row in rows)) if rows else len(header)
              for i, header in enumerate(headers)]
    print("  ".join(header.ljust(width) for header, width in zip(headers, widths, strict=True)).rstrip())
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    total = data["total"]
    print(f"total {data['after'][:19]} – {data['before'][:19]} UTC: {total['inspections']} inspected, "
          f"{total['anomalous']} anomalous ({100 * total['anomalous_rate']:.1f}%), {total['rejected']} rejected frames"
          + (" (cut: choose a larger bucket or a shorter window)" if data["truncated"] else ""))


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def register(subparsers: argparse._SubParsersAction) -> None:
    stats = subparsers.add_parser("stats", help="inspected, anomalous and rejected per line or source per hour "
                                                "(the dashboard's numbers)")
    config_argument(stats)
    stats.add_argument("--since", help="from: ISO time (UTC if no offset) or a duration ago (default 24h before "
                                       "--until)")
    stats.add_argument("--until", help="to: ISO time or a duration ago (default now)")
    stats.add_argument("--by", choices=("line", "source"), default="line",
                       help="one series per line (a source without a line is its own) or per source")
    stats.add_argument("--bucket", default="1h", help="bucket length: seconds or a duration (15m, 1h, 1d; "
                                                      "default 1h)")
    stats.add_argument("--json", action="store_true", help="the API's JSON instead of a table")
    stats.set_defaults(func=cmd_stats, short_lived=True)
