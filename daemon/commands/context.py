"""What the operator commands share: finding and loading the configuration, the database and artifact store
they work on, usage errors, and small input/output helpers. Each command module imports these by their public
names from here and from no other command module, so the command modules do not depend on one another.

Everything here imports its heavy dependencies (pydantic, SQLAlchemy, torch) inside the function that needs
them: the history commands must start fast (tests/daemon/test_cli_startup.py).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy import Connection
    from sqlalchemy.orm import Session, sessionmaker

    from adapters.storage import ArtifactStore
    from daemon.config.settings import Settings


def usage(message: str) -> Exception:
    from daemon.cli import UsageError

    return UsageError(message)



def config_path(value: str | None) -> Path | None:
    """The config file every command uses (`daemon.config.settings.find_config`: --config, $ANOMALYD_CONFIG,
    ./config.toml, /etc/anomalyd/config.toml; None: built-in defaults)."""
    from daemon.config.settings import find_config

    return find_config(value)



def load_settings(args: argparse.Namespace):
    from daemon.cli import UsageError
    from daemon.config.settings import ConfigError, load_config

    try:
        return load_config(config_path(getattr(args, "config", None)))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None



def import_factory(spec: str):
    """`package.module:callable` → the callable (a detector factory taking the Settings; tests, plugins)."""
    import importlib

    from daemon.cli import UsageError

    module_name, _, attribute = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UsageError(f"--detector-factory {spec!r}: {exc}") from None



def config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="configuration file (default: $ANOMALYD_CONFIG or ./config.toml)")



def database(settings: Settings, config: str | None = None) -> contextlib.AbstractContextManager[sessionmaker[Session]]:
    """A session factory on the configured database, which must exist (only `run` and `db upgrade` create one)."""
    from daemon.commands.database import existing_database

    return existing_database(settings.database_options(), config)



def history_database(args: argparse.Namespace) -> contextlib.AbstractContextManager[Callable[[], Connection]]:
    """`database` for the commands that need nothing but the history (defects, label, models list, stats): the
    configuration's [database] alone is read, without the validation models, when it plainly can be, and the
    connections are Core ones (`adapters.db.history` needs no ORM)."""
    from daemon.commands.database import configured_database, existing_database

    return existing_database(configured_database(args.config), args.config, orm=False)



def store(settings: Settings) -> ArtifactStore:
    from adapters.storage import ArtifactStore

    return ArtifactStore(settings.resolve(settings.storage.dir), save_frames=settings.storage.save_frames,
                         jpeg_quality=settings.storage.jpeg_quality)



def print_json(items: Any) -> None:
    json.dump(items, sys.stdout, indent=2)
    sys.stdout.write("\n")



def time_window(args: argparse.Namespace) -> tuple[Any, Any]:
    """(after, before) from --since / --until (RFC 3339 or a duration back from now); a bad value is a usage error."""
    from adapters.history_args import HistoryError, parse_when

    try:
        after = parse_when(args.since, name="--since") if args.since else None
        before = parse_when(args.until, name="--until") if args.until else None
    except HistoryError as exc:
        raise usage(str(exc)) from None
    return after, before



def current_user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"



def good_images(directory: Path) -> list[Path]:
    from model.preprocess import IMAGE_SUFFIXES

    if not directory.is_dir():
        raise usage(f"--good {directory}: not a directory")
    files = sorted(path for path in directory.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
    if not files:
        raise usage(f"--good {directory}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return files



def load_tensors(files: list[Path], size: int, reference: bool) -> tuple[Any, list[str]]:
    """(N,3,S,S) tensor of the decodable files and the problems with the others (named, not fatal)."""
    import torch

    from model.preprocess import ImageDecodeError, decode_image, fast_transform, open_pil, reference_transform

    tensors, problems = [], []
    for path in files:
        try:
            if reference:
                tensors.append(reference_transform(open_pil(path), size))
            else:
                tensors.append(fast_transform(decode_image(path), size))
        except (ImageDecodeError, OSError, ValueError) as exc:
            problems.append(f"{path}: {exc}")
    if not tensors:
        raise usage(f"no decodable known-good image among {len(files)} files: " + "; ".join(problems[:3]))
    return torch.stack(tensors), problems
