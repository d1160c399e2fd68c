"""The `anomalyd` command line.

Each command group lives in its own module under `daemon/commands/` and registers its subcommands here; the
heavy imports (torch, SQLAlchemy) happen only when a command runs, so `anomalyd --help` stays fast.
Exit status: 0 success, 1 runtime failure, 2 usage error.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import sys
from collections.abc import Sequence

# Modules that define `register(subparsers)`; each subcommand sets `func` via set_defaults.
COMMAND_MODULES = (
    "daemon.commands.model_commands",  # predict, train, weights
    "daemon.commands.eval_commands",  # eval
    "daemon.commands.run_commands",  # run, db
    "daemon.commands.ops_commands",  # defects, label, models
    "daemon.commands.retrain_commands",  # retrain
    "daemon.commands.token_commands",  # tokens
    "daemon.commands.config_commands",  # config check
    "daemon.commands.export_commands",  # export
    "daemon.commands.reference_commands",  # references list|add|remove
    "daemon.commands.stats_commands",  # stats
    "daemon.commands.threshold_commands",  # calibrate, thresholds show|history|pin|unpin
    "daemon.commands.geometry_commands",  # geometry show|history|set|reset
)

# The module that registers each command: a command line that names one builds only that module's parser (the
# same parsing, help and messages for it) instead of importing and building all of them.
# tests/daemon/test_cli_startup.py checks this table against what the modules register.
COMMAND_OWNERS = {
    "predict": "daemon.commands.model_commands", "train": "daemon.commands.model_commands",
    "eval": "daemon.commands.eval_commands", "weights": "daemon.commands.model_commands",
    "run": "daemon.commands.run_commands", "db": "daemon.commands.run_commands",
    "defects": "daemon.commands.ops_commands", "label": "daemon.commands.ops_commands",
    "models": "daemon.commands.ops_commands", "calibrate": "daemon.commands.threshold_commands",
    "retrain": "daemon.commands.retrain_commands", "tokens": "daemon.commands.token_commands",
    "config": "daemon.commands.config_commands", "export": "daemon.commands.export_commands",
    "references": "daemon.commands.reference_commands", "stats": "daemon.commands.stats_commands",
    "thresholds": "daemon.commands.threshold_commands", "geometry": "daemon.commands.geometry_commands",
}


class UsageError(Exception):
    """A bad argument value: reported with exit status 2."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with `command` (a key of COMMAND_OWNERS), only the module owning it is registered."""
    parser = argparse.ArgumentParser(
        prog="anomalyd",
        description="Zero-shot anomaly detection for industrial inspection: the daemon, and its model and operator tools.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="debug log output, and the traceback of a failure")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_name in (COMMAND_OWNERS[command],) if command in COMMAND_OWNERS else COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def command_named(argv: Sequence[str]) -> str | None:
    """The command a command line names, when nothing but -v/--verbose stands before it (else None: anything
    else there, e.g. --help or a typo, gets the whole parser and its messages)."""
    for item in argv:
        if item == "--verbose" or (item.startswith("-v") and set(item[1:]) == {"v"}):
            continue
        return item if item in COMMAND_OWNERS else None
    return None


def split_config_option(argv: Sequence[str]) -> tuple[list[str], str | None]:
    """`--config X` / `--config=X` taken out wherever it stands (before or after the command and its action),
    so every command finds its configuration the same way (`daemon.config.settings.find_config`)."""
    rest: list[str] = []
    config = None
    items = list(argv)
    index = 0
    while index < len(items):
        item = items[index]
        if item == "--":
            rest.extend(items[index:])
            break
        if item == "--config" and index + 1 < len(items):
            config, index = items[index + 1], index + 2
            continue
        if item.startswith("--config="):
            config, index = item.split("=", 1)[1], index + 1
            continue
        rest.append(item)
        index += 1
    return rest, config


def main(argv: Sequence[str] | None = None) -> int:
    # Start-up allocates some 60k long-lived objects (SQLAlchemy, pydantic, the config models) and the cyclic garbage
    # collector would walk them again and again: about a quarter of an operator command's CPU time. It stays off
    # while the parser is built and, for the short-lived commands (`set_defaults(short_lived=True)`: they exit
    # within a second), for the whole command; every other command runs with it on.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _main(argv, gc_was_enabled)
    finally:
        if gc_was_enabled:
            gc.enable()


def _main(argv: Sequence[str] | None, gc_was_enabled: bool) -> int:
    argv, config = split_config_option(sys.argv[1:] if argv is None else argv)
    parser = build_parser(command_named(argv))
    args = parser.parse_args(argv)
    if gc_was_enabled and not getattr(args, "short_lived", False):
        gc.enable()
    if config is not None or not hasattr(args, "config"):
        args.config = config
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs each request's full URL at INFO: a webhook's path or query holds its secret (Slack, Teams).
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        # The CPU runtime of CNN trunks for every command ([runtime].cnn; `anomalyd run` applies its config's value
        # again at start), so offline figures come from the daemon's own runtime.
        from adapters.cnn_runtime import choose as choose_cnn_runtime

        choose_cnn_runtime(os.environ.get("ANOMALYD_RUNTIME__CNN", "auto"))
        return int(args.func(args) or 0)
    except UsageError as exc:
        parser.error(str(exc))  # exits 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # runtime failure: one clear line, traceback with -v
        logging.getLogger("anomalyd").debug("traceback", exc_info=True)
        print(f"anomalyd: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # `python -m daemon.cli`: run the `daemon.cli` the commands import, so that there is one UsageError class (this
    # copy's would not catch theirs: a usage error would exit 1 instead of 2)
    from daemon.cli import main as imported_main

    sys.exit(imported_main())
