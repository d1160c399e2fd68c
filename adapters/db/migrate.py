"""Alembic migrations, configured from code (no alembic.ini needed): `upgrade(engine_or_url)`.

Concurrent upgrades (two workers started together on a fresh database) take turns: on PostgreSQL the migration
transaction first takes a transaction-level advisory lock (`pg_advisory_xact_lock(MIGRATION_LOCK_KEY)`, in
migrations/env.py, released at commit or when the connection dies); on SQLite the upgrade holds an exclusive
`flock` on `<database file>-migrate.lock`. The one that waited then finds the schema at head and does nothing.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Alembic announces each of its plugins at INFO when first imported; the "Running upgrade" lines are what matters.
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)

from alembic import command  # noqa: E402 - after the logger level above
from alembic.config import Config  # noqa: E402
from alembic.runtime.migration import MigrationContext  # noqa: E402
from alembic.script import ScriptDirectory  # noqa: E402
from sqlalchemy import Engine  # noqa: E402

# `migrations/` sits next to `adapters/` both in a checkout and in site-packages (a top-level package); found by
# path because an unrelated `migrations` directory in the working directory could shadow the import.
MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # The engine travels as an attribute: URLs with '%' (escaped passwords) would break ini interpolation.
    config.attributes["engine"] = engine
    return config


# "anomalyd" folded into PostgreSQL's 64-bit advisory lock key space; the same in every process.
MIGRATION_LOCK_KEY = 0x616E6F6D616C7964


@contextmanager
def sqlite_migration_lock(engine: Engine) -> Iterator[None]:
    """An exclusive flock beside a SQLite database file for the upgrade's duration (nothing for other databases
    or in-memory ones: PostgreSQL locks inside the migration transaction)."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:" or database.startswith("file:"):
        yield
        return
    lock_path = Path(database).expanduser().with_name(Path(database).name + "-migrate.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Apply migrations up to `revision` (idempotent; concurrent calls, in any processes, take turns); returns the
    revisions before and after, both read in the same turn (the file's first connection included, on SQLite)."""
    with sqlite_migration_lock(engine):
        before = current_revision(engine)
        command.upgrade(alembic_config(engine), revision)
        return before, current_revision(engine)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(config).get_current_head()
