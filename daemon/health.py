"""What readiness checks beyond "the threads are alive": recent failure rate, writable storage and database,
sources that stopped for good. Each check returns a problem string naming its cause, or None."""

from __future__ import annotations

import collections
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import text


class OutcomeWindow:
    """The outcomes of the most recent frames: ok (an inspection or rejected row) or failed (handed back /
    dead-lettered). Unhealthy when, among the last `recent` outcomes of the last `window_s` seconds, at least
    `min_failures` failed and they are more than `max_ratio` of them: every frame failing on a full disk, a
    read-only database or a poison message shows here while a short outage already recovered from does not."""

    def __init__(self, recent: int = 20, window_s: float = 60.0, max_ratio: float = 0.5, min_failures: int = 5,
                 clock=time.monotonic) -> None:
        self.recent, self.window_s, self.max_ratio, self.min_failures = recent, window_s, max_ratio, min_failures
        self._clock = clock
        self._outcomes: collections.deque[tuple[float, bool]] = collections.deque(maxlen=recent)
        self._lock = threading.Lock()

    def add(self, ok: bool) -> None:
        with self._lock:
            self._outcomes.append((self._clock(), ok))

    def problem(self) -> str | None:
        horizon = self._clock() - self.window_s
        with self._lock:
            outcomes = [ok for when, ok in self._outcomes if when >= horizon]
        failed = outcomes.count(False)
        if failed >= self.min_failures and failed > self.max_ratio * len(outcomes):
            return (f"{failed} of the last {len(outcomes)} frames failed (more than {self.max_ratio:.0%}); "
                    f"see anomalyd_frames_failed_total and the log")
        return None


def storage_problem(root: str | Path) -> str | None:
    """None when a file can be created (and removed) in the artifacts folder."""
    try:
        handle, name = tempfile.mkstemp(prefix=".ready-", suffix=".tmp", dir=root)
        try:
            os.write(handle, b"ok")
        finally:
            os.close(handle)
            os.unlink(name)
    except OSError as exc:
        return f"artifacts folder {root} is not writable: {exc.strerror or exc}"
    return None


def database_write_problem(engine: Any) -> str | None:
    """None when the database takes a write: a no-op UPDATE needs a writable database on SQLite (a read-only
    file) and PostgreSQL (read-only transactions, a standby) alike; it is rolled back."""
    try:
        with engine.connect() as connection:
            connection.execute(text("UPDATE rejected_frames SET reason = reason WHERE 1 = 0"))
            connection.rollback()
    except Exception as exc:
        return f"database is not writable: {str(exc).splitlines()[0][:300]}"
    return None


def source_problem(source: Any) -> str | None:
    """A source that should run (enabled, not a finished video file) but whose thread ended."""
    status = str(getattr(getattr(source, "status", ""), "value", getattr(source, "status", "")))
    if status == "disabled" or getattr(source, "kind", "") == "video" or not hasattr(source, "running"):
        return None
    if not source.running:
        last = getattr(source, "last_error", None)
        return f"source {source.id} is not running" + (f" (last error: {last})" if last else "")
    return None
