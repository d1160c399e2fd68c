"""`anomalyd retrain [--now]`: the retraining schedule and label count, or a retraining run in the foreground.

Without --now: whether scheduled retraining is on, its schedule and next due time, the labels recorded since the
last completed run against `min_new_labels`, the promotion rule, the last run and the active model version.
With --now: one run right away (whatever the label count) with a progress bar; a promoted candidate becomes the
active version in the database, and a running daemon sharing it hot-swaps within seconds. Exit status 1 when the
run fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from typing import Any

DEFAULT_CONFIG = "config.toml"


def _settings(args: argparse.Namespace) -> Any:
    """The configuration found by `daemon.config.settings.find_config` (the same rule for every command)."""
    from daemon.cli import UsageError
    from daemon.config.settings import ConfigError, find_config, load_config

    try:
        return load_config(find_config(args.config))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _sessions(settings: Any, config: str | None = None) -> Any:
    """Sessions on the configured database, which must exist (only `run` and `db upgrade` create one)."""
    from daemon.commands.database import existing_database

    with existing_database(settings.database_options(), config) as sessions:
        return sessions  # the engine stays usable after dispose(): it reconnects on demand


def _status(settings: Any, sessions: Any) -> dict[str, Any]:
    from adapters.db.repository import active_model_version
    from daemon.config.schedule import parse_schedule
    from daemon.learning.retraining import last_completed_run, new_labels_since_last_run, training_runs

    cfg = settings.retraining
    schedule = parse_schedule(cfg.schedule)
    with sessions() as session:
        new_labels = new_labels_since_last_run(session)
        completed = last_completed_run(session)
        runs = training_runs(session, limit=1)
        active = active_model_version(session)
    last = runs[0] if runs else None
    return {
        "enabled": cfg.enabled, "schedule": cfg.schedule, "schedule_text": schedule.describe(),
        "next_due": schedule.next_after(datetime.now(timezone.utc)).isoformat() if cfg.enabled else None,
        "min_new_labels": cfg.min_new_labels, "new_labels": new_labels,
        "last_completed_run_started_at": completed.started_at.isoformat() if completed else None,
        "promotion": cfg.promotion, "rule": cfg.rule, "metric": cfg.metric, "tolerance": cfg.tolerance,
        "last_run": None if last is None else {
            "id": last.id, "status": last.status, "started_at": last.started_at.isoformat(),
            "candidate_version": last.candidate_version, "promoted": last.promoted},
        "active_version": active.version if active else None,
    }


def _print_status(status: dict[str, Any]) -> None:
    if status["enabled"]:
        print(f"scheduled retraining: on, {status['schedule_text']}; next check {status['next_due']}")
    else:
        print(f"scheduled retraining: off ([retraining].enabled = false; schedule {status['schedule_text']})")
    since = status["last_completed_run_started_at"] or "ever (no completed run yet)"
    due = "enough for the next scheduled run" if status["new_labels"] >= status["min_new_labels"] else "not enough yet"
    print(f"labels since {since}: {status['new_labels']} of {status['min_new_labels']} needed ({due})")
    print(f"promotion: {status['promotion']}, rule {status['rule']} on {status['metric']} "
          f"(tolerance {status['tolerance']:g})")
    last = status["last_run"]
    if last is None:
        print("last run: none")
    else:
        print(f"last run: #{last['id']} {last['status']} (started {last['started_at']}), candidate "
              f"{last['candidate_version'] or '-'}, promoted {'yes' if last['promoted'] else 'no'}")
    print(f"active model version: {status['active_version'] or '-'}")


def cmd_retrain(args: argparse.Namespace) -> int:
    settings = _settings(args)
    sessions = _sessions(settings, args.config)
    if not args.now:
        status = _status(settings, sessions)
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            _print_status(status)
        return 0
    from daemon.learning.head_retraining import make_retrainer, refusal

    why = refusal(settings, sessions)
    if why is not None:
        from daemon.cli import UsageError

        raise UsageError(why)
    from tqdm.auto import tqdm

    bar = None

    def progress(event: dict[str, Any]) -> None:
        nonlocal bar
        kind = event.get("event")
        if kind == "start":
            bar = tqdm(total=int(event["steps"]), desc=f"retraining {event['version']}", unit="step",
                       disable=args.json, file=sys.stderr)
        elif bar is not None and kind in ("epoch", "evaluated"):
            bar.update(1)
            if kind == "epoch":
                bar.set_postfix(epoch=f"{event['epoch']}/{event['epochs']}", loss=f"{event['loss']:.4f}")
            else:
                bar.set_postfix(evaluated=event["model"])

    outcome = make_retrainer(settings, sessions).run(trigger="cli", progress=progress)
    if bar is not None:
        bar.close()
    if args.json:
        print(json.dumps(outcome.as_dict(), indent=2, default=str))
    elif outcome.status == "succeeded":
        verdict = "promoted (now active)" if outcome.promoted else (
            "passes; activate it with `anomalyd models activate " + str(outcome.candidate_version) + "`"
            if outcome.passes else "rejected")
        print(f"run #{outcome.run_id}: candidate {outcome.candidate_version} {verdict}: {outcome.reason}")
    else:
        print(f"run #{outcome.run_id} {outcome.status}: {outcome.reason}", file=sys.stderr)
    return 0 if outcome.status == "succeeded" else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("retrain", help="retraining schedule and label count, or a run now (--now)",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--now", action="store_true", help="run a retraining now, in the foreground")
    parser.add_argument("--config", help="configuration file (default $ANOMALYD_CONFIG or ./config.toml)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=cmd_retrain)
