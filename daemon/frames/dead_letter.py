"""Dead letters: a frame that keeps failing is given up after `max_attempts`, recorded and acknowledged.

Without this a frame whose result cannot be stored (a value the database refuses, artifacts that cannot be
written, a detector that fails on it) is handed back to its source, redelivered and fails again without end,
and with MQTT's receive window a few of them block every valid frame. Attempts are counted per frame_id (the
source's idempotency key, stable across redeliveries) in a bounded LRU. A resource fault does not count
(`resource_fault`: a full or read-only disk, a quota, the database down or unreachable, memory exhausted): every
frame fails the same way while it lasts and none of them is poison, so it is waited out (daemon/telemetry/health.py
`ResourceFaults`) and the frame retried, however long it takes. Only the input's own faults (undecodable bytes, a
value the database refuses, a detector failing on this frame) count towards dead-lettering.

Giving up means: a `rejected_frames` row whose reason starts with "dead letter", the
`anomalyd_frames_dead_lettered_total` counter, one error log line, and `frame.done(True)` (acknowledged/moved).
When even that row cannot be written (the database is down), the frame goes back to its source as before.
"""

from __future__ import annotations

import collections
import errno
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

DEAD_LETTER_PREFIX = "dead letter"


# errno values that say the machine lacks a resource (space, quota, a writable disk, memory, descriptors), not
# that the input is bad.
RESOURCE_ERRNOS: dict[int, str] = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "file system read-only",
    errno.ENOMEM: "out of memory",
    errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files",
}


def resource_fault(exc: BaseException) -> str | None:
    """What resource is missing when `exc` is a failure of the infrastructure rather than of the frame, else None:
    the database unreachable, down, read-only or its connection lost; a disk full, over quota or read-only;
    memory exhausted (MemoryError, ENOMEM). Follows `raise ... from` / implicit chaining (an OSError wrapped by a
    library)."""
    from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (OperationalError, DisconnectionError)):
            return "database unavailable"
        if isinstance(current, DBAPIError) and bool(current.connection_invalidated):
            return "database connection lost"
        if isinstance(current, MemoryError):
            return "out of memory"
        if isinstance(current, OSError) and current.errno in RESOURCE_ERRNOS:
            return RESOURCE_ERRNOS[current.errno]
        current = current.__cause__ or current.__context__
    return None


def is_transient(exc: BaseException) -> bool:
    """A resource fault (`resource_fault`): it does not count towards dead-lettering."""
    return resource_fault(exc) is not None


class DeadLetters:
    """Counts failed attempts per frame_id; `failed(...)` says whether the frame was dead-lettered."""

    def __init__(self, max_attempts: int, record: Callable[[Any, str, str], None], *,
                 on_dead_letter: Callable[[str], None] | None = None, remember: int = 10_000) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.max_attempts = max_attempts
        self._record = record  # (frame, source id, reason) → a rejected row; raises when it cannot
        self._on_dead_letter = on_dead_letter
        self._attempts: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._remember = remember
        self._lock = threading.Lock()
        self.count = 0

    def attempts(self, frame_id: str) -> int:
        with self._lock:
            return self._attempts.get(frame_id, 0)

    def failed(self, frame: Any, source_id: str, stage: str, exc: BaseException) -> bool:
        """One more failed attempt of `frame`. True: it was dead-lettered (recorded and `done(True)` called);
        False: the caller hands it back to its source (`done(False)`)."""
        if is_transient(exc):
            return False
        with self._lock:
            attempts = self._attempts.pop(frame.frame_id, 0) + 1
            self._attempts[frame.frame_id] = attempts
            while len(self._attempts) > self._remember:
                self._attempts.popitem(last=False)
        if attempts < self.max_attempts:
            return False
        error = str(exc).splitlines()[0][:500] if str(exc) else ""
        reason = (f"{DEAD_LETTER_PREFIX}: failed {attempts} times, last at the {stage} stage: "
                  f"{type(exc).__name__}: {error}")
        try:
            self._record(frame, source_id, reason)
        except Exception as record_exc:
            log.warning("cannot record the dead letter %s (%s); handing it back to its source", frame.frame_id,
                        str(record_exc).splitlines()[0][:200] if str(record_exc) else type(record_exc).__name__)
            return False
        with self._lock:
            self._attempts.pop(frame.frame_id, None)
            self.count += 1
        log.error("frame %s from %s given up (%s)", frame.frame_id, source_id, reason)
        if self._on_dead_letter is not None:
            self._on_dead_letter(source_id)
        frame.done(True)
        return True
