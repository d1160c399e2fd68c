"""`anomalyd run` (the daemon) and `anomalyd db upgrade` (migrations)."""

from __future__ import annotations

import argparse
import logging

from daemon.commands.context import import_factory, load_settings

log = logging.getLogger("anomalyd")

DEFAULT_CONFIG = "config.toml"


def cmd_run(args: argparse.Namespace) -> int:
    from daemon.api import routers
    from daemon.process.service import Service

    settings = load_settings(args)
    factory = import_factory(args.detector_factory) if args.detector_factory else None
    service = Service(settings, role=args.role, detector_factory=factory, routers=routers())
    return service.run()


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from adapters.db import make_engine, upgrade

    settings = load_settings(args)
    engine = make_engine(settings.database_url)
    try:
        before, after = upgrade(engine)
    finally:
        engine.dispose()
    where = engine.url.render_as_string(hide_password=True)
    print(f"{where}: {before or '(empty)'} -> {after}" if before != after else f"{where}: already at {after}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser("run", help="run the inspection daemon")
    run.add_argument("--config", help="configuration file (default: $ANOMALYD_CONFIG or ./config.toml)")
    run.add_argument("--role", choices=("capture", "worker", "all"), default="all",
                     help="capture: sources → Redis stream; worker/all: inspect (default all)")
    run.add_argument("--detector-factory", metavar="MODULE:CALLABLE", default=None,
                     help=argparse.SUPPRESS)  # a callable(settings) -> Detector instead of [model] (tests, plugins)
    run.set_defaults(func=cmd_run)

    db = subparsers.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", metavar="ACTION")
    db_sub.required = True
    upgrade = db_sub.add_parser("upgrade", help="apply the Alembic migrations")
    upgrade.add_argument("--config", help="configuration file (default: $ANOMALYD_CONFIG or ./config.toml)")
    upgrade.set_defaults(func=cmd_db_upgrade)
