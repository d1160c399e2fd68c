"""A budget of bytes for decoded frames in flight: decode waits while frames already decoded (in the batcher,
the model, the writers) hold it, so memory is bounded in bytes, not only in frames: eight tiny PNGs declaring
10000x9999 pixels each cannot all be decoded at once. Priority frames (live cameras, triggers) go first: while
one waits, the bytes freed are not taken by a backlog frame."""

from __future__ import annotations

import threading
from typing import Any


class ByteBudget:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"budget must be >= 1 byte, got {capacity}")
        self.capacity = capacity
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()
        self._priority_waiting = 0

    def acquire(self, nbytes: int, abort: threading.Event | None = None, *, priority: bool = False) -> int:
        """Wait until `nbytes` fit (a frame larger than the whole budget waits until nothing else is held);
        returns the amount to `release` later. With `abort` set it stops waiting (shutdown) and takes it anyway.
        priority=True: served before the waiters without it."""
        nbytes = max(0, min(int(nbytes), self.capacity))
        with self._cond:
            if priority:
                self._priority_waiting += 1
            try:
                while (self.used + nbytes > self.capacity or (not priority and self._priority_waiting)) \
                        and not (abort is not None and abort.is_set()):
                    self._cond.wait(0.1)
            finally:
                if priority:
                    self._priority_waiting -= 1
                    self._cond.notify_all()
            self.used += nbytes
            self.peak = max(self.peak, self.used)
        return nbytes

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.used = max(0, self.used - nbytes)
            self._cond.notify_all()

    def hold_until_done(self, frame: Any, nbytes: int) -> None:
        """Release `nbytes` when the frame is finished (`frame.done(...)`, called exactly once per frame)."""
        callback = frame.on_done

        def release_then(ok: bool) -> None:
            self.release(nbytes)
            if callback is not None:
                callback(ok)

        frame.on_done = release_then
