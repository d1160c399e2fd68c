"""A logging filter that lets one of a run of identical errors through per interval, with a count.

On a full disk or a read-only database every frame fails the same way: without this each retry logs a full
traceback (about 1,400 lines in 45 s in the issue that asked for it). Records are "identical" when they share
the logger, level, message template and exception type and first line, whatever the arguments (frame ids).
The first one of a run passes as is; the others within `interval_s` are counted and dropped; the first one after
the interval passes with "(N more like this in the last Xs)" appended (and without its traceback when the
suppressed ones had the same one). Only WARNING and above are filtered.
"""

from __future__ import annotations

import logging
import threading
import time


class RepeatFilter(logging.Filter):
    def __init__(self, interval_s: float = 60.0, clock=time.monotonic) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._runs: dict[tuple, list[float | int]] = {}  # key -> [first passed at, suppressed count]

    @staticmethod
    def _key(record: logging.LogRecord) -> tuple:
        exc = record.exc_info[1] if record.exc_info else None
        exc_text = (str(exc).splitlines() or [""])[0][:200] if exc is not None else ""
        return record.name, record.levelno, str(record.msg), type(exc).__name__ if exc else "", exc_text

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = self._key(record)
        now = self._clock()
        with self._lock:
            run = self._runs.get(key)
            if run is None or now - run[0] >= self.interval_s:
                suppressed = int(run[1]) if run is not None else 0
                self._runs[key] = [now, 0]
                if len(self._runs) > 1000:  # bounded: forget the oldest runs
                    for old in sorted(self._runs, key=lambda k: self._runs[k][0])[:500]:
                        del self._runs[old]
            else:
                run[1] += 1
                return False
        if suppressed:
            record.msg = f"{record.getMessage()} ({suppressed} more like this in the last {self.interval_s:.0f}s)"
            record.args = None
            record.exc_info = None  # the first of the run had the traceback
            record.exc_text = None
        return True


def install(logger: logging.Logger, interval_s: float = 60.0) -> RepeatFilter:
    """The logger's RepeatFilter (added once, whatever the number of calls)."""
    for existing in logger.filters:
        if isinstance(existing, RepeatFilter):
            return existing
    repeat_filter = RepeatFilter(interval_s)
    logger.addFilter(repeat_filter)
    return repeat_filter
