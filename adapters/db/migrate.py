"""Alembic migrations, configured from code (no alembic.ini needed): `upgrade(engine_or_url)`."""

from __future__ import annotations

import logging
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


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to `revision` (idempotent)."""
    command.upgrade(alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(config).get_current_head()
