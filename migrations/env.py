"""Alembic environment: runs migrations on the engine handed over by `adapters.db.migrate` (online only)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, text

from adapters.db.tables import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    engine = config.attributes.get("engine")
    if engine is None:  # plain `alembic` CLI use with an ini file
        engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            # Concurrent upgrades take turns (adapters/db/migrate.py): the lock opens the one transaction the
            # whole migration runs in, so the version is read after the other upgrade committed.
            from adapters.db.migrate import MIGRATION_LOCK_KEY

            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",  # SQLite needs table rebuilds for ALTER
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; run `anomalyd db upgrade`")
run_migrations_online()
