"""The operator commands' way into the database: open one that exists, never create one.

Only `anomalyd run` and `anomalyd db upgrade` create and migrate a database. The other commands (defects, label,
models, retrain, tokens) open the configured one and, when there is none, fail with a message naming the config
file that was used (or where one was looked for) and the database they expected, so that a command run from the
wrong folder does not silently answer from a new empty database. Alembic is imported only when an existing
database needs a migration, and then quietly: these commands answer in well under a second.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

if TYPE_CHECKING:
    from daemon.config.file import DatabaseOptions


class NoDatabaseError(RuntimeError):
    """The configured database does not exist or holds no anomalyd schema (exit status 1)."""


def sqlite_file(url: str) -> Path | None:
    """The file of a file-backed SQLite URL, else None (in-memory, other databases). Read here, not by SQLAlchemy's
    URL parser, so that telling "there is no database file" imports no SQLAlchemy (a third of a second):
    `sqlite:///relative.db`, `sqlite:////absolute.db`, `sqlite+driver:///...?options`; `sqlite://` is in memory."""
    scheme, separator, rest = url.partition("://")
    if not separator or scheme.split("+")[0].lower() != "sqlite":
        return None
    host, slash, database = rest.partition("?")[0].partition("/")
    database = unquote(database)
    if host or not slash or not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def _schema_revision(engine: Any) -> str | None:
    from sqlalchemy import inspect, text

    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


_REVISION = re.compile(r"""^(down_)?revision\s*(?::[^=]*)?=\s*(?:["']([^"']+)["']|None)""", re.MULTILINE)


def migration_heads() -> set[str]:
    """The newest revision(s) of `migrations/versions`, read from the files' text (no Alembic import)."""
    revisions, parents = set(), set()
    for path in (_migrations_dir() / "versions").glob("*.py"):
        for match in _REVISION.finditer(path.read_text(encoding="utf-8")):
            if match.group(2):
                (parents if match.group(1) else revisions).add(match.group(2))
    return revisions - parents


def _migrations_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "migrations"


def _quiet_upgrade(engine: Any) -> None:
    """Migrate an existing database to the current schema (only when it is behind) without Alembic's INFO lines."""
    if _schema_revision(engine) in migration_heads():
        return
    alembic_logger = logging.getLogger("alembic")
    level = alembic_logger.level
    alembic_logger.setLevel(logging.WARNING)
    try:
        from adapters.db.migrate import upgrade

        upgrade(engine)
    finally:
        alembic_logger.setLevel(level)


def configured_database(config: str | None) -> DatabaseOptions:
    """[database] of the configuration a command uses (`--config` or the usual search), read without validating
    the rest of the file when it plainly can be (`config_file.database_options`: no pydantic, a third of the
    start-up of `anomalyd defects`); otherwise the whole file is validated and its errors are the usage error."""
    from daemon.cli import UsageError
    from daemon.config.file import ConfigError, database_options, find_config, read_config_data

    path = find_config(config)
    try:
        options = database_options(read_config_data(path))
        if options is None:
            from daemon.config.settings import load_config

            options = load_config(path).database_options()
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    return options


@contextlib.contextmanager
def existing_database(database: DatabaseOptions, config: str | None = None, *, orm: bool = True) -> Iterator[Any]:
    """A session factory on the configured database (`configured_database`, or `Settings.database_options()`),
    which must already exist; the engine is disposed after. `orm=False`: Core connections instead of ORM sessions
    (`engine.connect`; enough for `adapters.db.history`, and no `sqlalchemy.orm` import)."""
    from daemon.config.file import describe_config_search

    url = database.url
    path = sqlite_file(url)
    hint = ("start the daemon (`anomalyd run`) or create it with `anomalyd db upgrade`, or point this command at "
            "the right configuration with --config or $ANOMALYD_CONFIG")
    if path is not None and not path.is_file():
        raise NoDatabaseError(f"no database at {path} ({describe_config_search(config)}); {hint}")
    # SQLAlchemy only now that there is a database to open
    from adapters.db.engine import make_engine

    engine = make_engine(url, echo=database.echo, pool_size=database.pool_size)
    try:
        if _schema_revision(engine) is None:
            where = path or engine.url.render_as_string(hide_password=True)
            raise NoDatabaseError(f"{where} holds no anomalyd tables ({describe_config_search(config)}); {hint}")
        _quiet_upgrade(engine)
        if not orm:
            yield engine.connect
            return
        from adapters.db.engine import make_session_factory

        yield make_session_factory(engine)
    finally:
        engine.dispose()
