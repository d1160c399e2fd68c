"""What readiness checks beyond "the threads are alive": recent failure rate, writable storage and database,
sources that stopped for good. Each check returns a problem string naming its cause, or None."""

from __future__ import annotations

import collections
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import text

log = logging.getLogger(__name__)


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


class ResourceFaults:
    """Resource faults being waited out (a full disk, the database down, memory exhausted: daemon/frames/dead_letter.py
    `resource_fault`). A fault starts an episode, logged once at ERROR; readiness names its cause while frames keep
    failing on it. The episode ends at the first frame that gets through (logged, with its duration) or, with no
    frame tried, `hold_s` after the last fault: readiness recovers by itself, the direct checks (storage and
    database writable) still tell. `backoff(...)` is the pause before a failed frame is handed back: growing from
    `first_pause_s` to `max_pause_s`, so a broker's or a test source's immediate redelivery does not spin."""

    def __init__(self, hold_s: float = 30.0, max_pause_s: float = 1.0, first_pause_s: float = 0.05,
                 clock=time.monotonic, on_fault=None) -> None:
        self.hold_s, self.max_pause_s, self.first_pause_s = hold_s, max_pause_s, first_pause_s
        self._clock = clock
        self._on_fault = on_fault  # (resource) -> None: the metric
        self._lock = threading.Lock()
        self._started: float | None = None
        self._last: float = 0.0
        self._cause = ""
        self._in_a_row = 0
        self.episodes = 0

    def fault(self, resource: str, stage: str, exc: BaseException) -> float:
        """One frame failed on a missing resource; returns the pause before it is handed back."""
        cause = f"{resource} at the {stage} stage: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        now = self._clock()
        with self._lock:
            new = self._started is None or now - self._last > self.hold_s
            if new:
                self._started, self.episodes, self._in_a_row = now, self.episodes + 1, 0
            self._last, self._cause = now, cause
            self._in_a_row += 1
            pause = min(self.max_pause_s, self.first_pause_s * 2 ** min(self._in_a_row - 1, 20))
        if self._on_fault is not None:
            self._on_fault(resource)
        if new:
            log.error("resource fault, waiting it out: %s; frames are handed back and retried, none is given up",
                      cause)
        return pause

    def recovered(self) -> None:
        """A frame got through: an episode in progress is over."""
        with self._lock:
            if self._started is None:
                return
            lasted, cause, self._started = self._clock() - self._started, self._cause, None
        log.warning("recovered from the resource fault after %.0fs (%s)", lasted, cause)

    def problem(self) -> str | None:
        with self._lock:
            if self._started is None or self._clock() - self._last > self.hold_s:
                return None
            since = self._clock() - self._started
            return f"waiting out a resource fault for {since:.0f}s ({self._cause}); frames are retried"


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
