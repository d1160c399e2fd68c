"""Shared test fixtures: where ../shared lives, and the rule for skipping.

Under CI (CI=true) anything a test needs must be there: a missing `../shared` or service is a failure,
never a skip. Outside CI (a user's fresh clone) such tests skip with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("ANOMALYD_SHARED_DIR", REPO_ROOT.parent / "shared"))
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require(condition: bool, reason: str) -> None:
    """Skip (outside CI) or fail (under CI) when a test's prerequisite is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    require(SHARED_DIR.is_dir(), f"{SHARED_DIR} is absent (the project's shared fixtures)")
    return SHARED_DIR


@pytest.fixture(scope="session")
def golden_dir(shared_dir: Path) -> Path:
    path = shared_dir / "golden" / "anomalyclip"
    require(path.is_dir(), f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def samples_dir(shared_dir: Path) -> Path:
    path = shared_dir / "data" / "inspection-samples"
    require((path / "meta.json").is_file(), f"{path}/meta.json is absent")
    return path


def _service(cls):
    from tests import services

    try:
        server = getattr(services, cls)()
        server.start()
    except FileNotFoundError as exc:
        require(False, str(exc))
    return server


@pytest.fixture(scope="session")
def mosquitto():
    """A Mosquitto broker for the whole session (tests that restart a broker start their own)."""
    server = _service("Mosquitto")
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_server():
    server = _service("Redis")
    yield server
    server.close()


@pytest.fixture(scope="session")
def postgres():
    server = _service("Postgres")
    yield server
    server.close()


@pytest.fixture
def private_postgres():
    """A PostgreSQL server of the test's own, which it may stop and start (outage tests)."""
    server = _service("Postgres")
    yield server
    server.close()


@pytest.fixture
def sqlite_sessions(tmp_path):
    """A migrated SQLite database of the test's own; yields its session factory."""
    from adapters.db import make_engine, make_session_factory, upgrade

    engine = make_engine(f"sqlite:///{tmp_path}/test.db")
    upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture(autouse=True)
def _cnn_trunks_on_pytorch_after_each_test():
    """The CLI and the daemon choose a process-wide CPU runtime for CNN trunks (model/runtime.py); a test that ran
    one in-process must not leave it to the next."""
    yield
    from model.runtime import use_trunk_compiler

    use_trunk_compiler(None)
