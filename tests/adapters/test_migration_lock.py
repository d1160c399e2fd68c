"""Concurrent migrations (issue 18, finding 2): two `anomalyd db upgrade` runs started together on a fresh
database both succeed (the second used to die with UniqueViolation on alembic_version), on PostgreSQL (advisory
lock) and SQLite (file lock), several times over; the schema ends at head with one version row."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from adapters.db.migrate import head_revision

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 4


def upgrade_twice_at_once(tmp_path: Path, url: str) -> list[subprocess.CompletedProcess]:
    config = tmp_path / f"{uuid.uuid4().hex[:8]}.toml"
    config.write_text(f'[database]\nurl = "{url}"\n[mqtt]\nenabled = false\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # A barrier: both processes import everything first, then start the upgrade when the go file appears, so
    # their migrations overlap instead of one finishing while the other still imports.
    go = tmp_path / f"go-{uuid.uuid4().hex[:8]}"
    probe = ("import sys, time, pathlib; from daemon.cli import main; import adapters.db.migrate; "
             f"go = pathlib.Path({str(go)!r}); "
             "[time.sleep(0.01) for _ in iter(lambda: go.exists(), True)]; sys.exit(main(sys.argv[1:]))")
    ready = [subprocess.Popen([sys.executable, "-c", probe, "db", "upgrade", "--config", str(config)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    go.touch()
    results = []
    for proc in ready:
        out, err = proc.communicate(timeout=180)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def assert_both_succeeded(results: list[subprocess.CompletedProcess], url: str) -> None:
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            versions = connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    finally:
        engine.dispose()
    assert versions == [head_revision()]


@pytest.mark.services
def test_concurrent_upgrades_on_a_fresh_postgresql_database_both_succeed(tmp_path, postgres):
    for _ in range(ROUNDS):
        url = postgres.create_database(f"mig_{uuid.uuid4().hex[:10]}")
        assert_both_succeeded(upgrade_twice_at_once(tmp_path, url), url)


def test_concurrent_upgrades_on_a_fresh_sqlite_database_both_succeed(tmp_path):
    for index in range(2):
        url = f"sqlite:///{tmp_path}/fresh{index}.db"
        assert_both_succeeded(upgrade_twice_at_once(tmp_path, url), url)
