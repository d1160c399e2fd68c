"""The tables the code knows (`adapters.db.schema`, which the ORM classes are mapped onto) are the tables the Alembic
migrations create, on SQLite and PostgreSQL: Alembic's autogenerate comparison finds nothing to change."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from adapters.db import Base, make_engine, upgrade
from adapters.db.schema import metadata
from tests.adapters.test_db import create_pg_database


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def test_migrations_create_exactly_the_schema_tables(backend, request, tmp_path):
    url = (f"sqlite:///{tmp_path}/schema.db" if backend == "sqlite"
           else create_pg_database(request.getfixturevalue("postgres").url))
    engine = make_engine(url)
    try:
        upgrade(engine)
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, metadata) == []
        assert Base.metadata is metadata  # the ORM classes map these same tables
        assert {mapper.local_table.name for mapper in Base.registry.mappers} == set(metadata.tables)
    finally:
        engine.dispose()
