"""`anomalyd run` (the daemon) and `anomalyd db upgrade` (migrations)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("anomalyd")

DEFAULT_CONFIG = "config.toml"


def _config_path(value: str | None) -> Path | None:
    """The config file every command uses (`daemon.config.find_config`: --config, $ANOMALYD_CONFIG,
    ./config.toml, /etc/anomalyd/config.toml; None: built-in defaults)."""
    from daemon.config import find_config

    return find_config(value)


def _load(args: argparse.Namespace):
    from daemon.cli import UsageError
    from daemon.config import ConfigError, load_config

    try:
        return load_config(_config_path(getattr(args, "config", None)))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def cmd_run(args: argparse.Namespace) -> int:
    from daemon.api import routers
    from daemon.service import Service

    settings = _load(args)
    factory = _import_factory(args.detector_factory) if args.detector_factory else None
    service = Service(settings, role=args.role, detector_factory=factory, routers=routers())
    return service.run()


def _import_factory(spec: str):
    """`package.module:callable` → the callable (a detector factory taking the Settings; tests, plugins)."""
    import importlib

    from daemon.cli import UsageError

    module_name, _, attribute = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UsageError(f"--detector-factory {spec!r}: {exc}") from None


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from adapters.db import current_revision, make_engine, upgrade

    settings = _load(args)
    engine = make_engine(settings.database_url)
    try:
        before = current_revision(engine)
        upgrade(engine)
        after = current_revision(engine)
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
