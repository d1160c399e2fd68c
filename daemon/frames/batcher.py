"""Dynamic batching: gather up to `max_batch_size` items, waiting at most `max_batch_delay` after the first.

The delay is measured from when the batch's first item was *put*, so an item never waits in the batcher longer
than the delay (plus the time the consumer was busy). The queue is bounded: `put` blocks (back-pressure) or times
out. The clock is injectable for tests.

Priority items (`put(item, priority=True)`: frames a PLC triggered and waits for) skip the queue: the next batch
is made of them alone and is handed out at once, without waiting for the batch to fill. They do not count
against `maxsize` (their callers bound them), so back-pressure from free-running sources never delays them.

Live items (`put(item, live=True)`: frames of `latest` live sources, e.g. cameras) have a lane of their own beside
the backlog of file/queue frames, so a camera frame never queues behind thousands of files. Each batch is filled
from both lanes by weighted round-robin (stride scheduling): while both hold items, live frames get `live_share`
of the places and the backlog the rest, so neither starves; a lane with nothing waiting lends its places to the
other and earns no credit meanwhile (no burst when it comes back). The live lane does not count against `maxsize`:
the intake keeps it to `live_room()` (one batch's live places), so its frames are the freshest and leave in the
next batch. `live_due_in(lead)` tells the intake when to take them while a backlog competes: shortly before the
batch in progress is expected to end (from the recent time between two batches), so a camera frame is captured
just before its batch rather than a batch earlier; at once while the consumer waits for a batch or no backlog
waits (then live frames may fill whole batches). A batch being formed waits, up to the batch delay, for the live
frames still being decoded (`live_incoming`).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class BatcherClosed(Exception):
    """`put` on a closed batcher."""


class DynamicBatcher(Generic[T]):
    def __init__(
        self,
        max_batch_size: int,
        max_batch_delay_s: float,
        maxsize: int = 256,
        clock: Callable[[], float] = time.monotonic,
        live_share: float = 0.5,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, not {max_batch_size}")
        if max_batch_delay_s < 0:
            raise ValueError(f"max_batch_delay_s must be >= 0, not {max_batch_delay_s}")
        if not 0 < live_share < 1:
            raise ValueError(f"live_share must be between 0 and 1 (exclusive), not {live_share}")
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.maxsize = max(maxsize, max_batch_size)
        self._clock = clock
        self._items: deque[tuple[float, T]] = deque()
        self._urgent: deque[T] = deque()
        self._live: deque[tuple[float, T]] = deque()
        self.live_share = live_share
        # Stride scheduling between the live lane and the backlog: each lane's virtual time advances by
        # 1/weight per item taken; the lane behind goes next.
        self._live_pass = 0.0
        self._backlog_pass = 0.0
        # When the next batch will be asked for: the last handout and the recent time between two handouts while
        # the consumer had work waiting; `_forming`: consumers inside get_batch (the next batch is being formed).
        self._handed_out_at: float | None = None
        self._busy_interval: float | None = None
        self._forming = 0
        # Live frames taken and still being decoded (set by the intake): a batch being formed waits for them, up
        # to the batch delay, rather than leaving them for the batch after.
        self.live_incoming: Callable[[], int] = lambda: 0
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._forming_started = threading.Condition(self._lock)
        self._closed = False

    def __len__(self) -> int:
        with self._lock:
            return len(self._items) + len(self._urgent) + len(self._live)

    def live_room(self) -> int:
        """How many more live items may wait: a whole batch's worth while no backlog waits, else the live
        share of one batch (at least one), so what waits in the live lane goes out in the next batch."""
        with self._lock:
            if self._items:
                quota = max(1, math.ceil(self.max_batch_size * self.live_share))
            else:
                quota = self.max_batch_size
            return max(0, quota - len(self._live))

    @property
    def closed(self) -> bool:
        return self._closed

    def live_due_in(self, lead_s: float = 0.0) -> float:
        """Seconds until live frames should be taken so that they are ready, `lead_s` (their decode) plus a tenth
        of a batch early, when the batch in progress is expected to end; 0 while no backlog waits, while a batch
        is being formed, or with no estimate yet."""
        with self._lock:
            return self._live_due_in(lead_s)

    def wait_live_due(self, lead_s: float, timeout: float) -> bool:
        """Wait until `live_due_in(lead_s)` is 0 (or a batch starts being formed); False after `timeout`."""
        end = time.monotonic() + timeout
        with self._lock:
            while True:
                due_in = self._live_due_in(lead_s)
                remaining = end - time.monotonic()
                if due_in <= 0 or remaining <= 0:
                    return due_in <= 0
                self._forming_started.wait(min(due_in, remaining))

    def wait_handout(self, timeout: float) -> None:
        """Wait until a batch starts being formed or is handed out (the live lane may have room again)."""
        with self._lock:
            self._forming_started.wait(timeout)

    def _live_due_in(self, lead_s: float) -> float:
        if not self._items or self._forming or self._handed_out_at is None or self._busy_interval is None:
            return 0.0  # no backlog competing (live frames may fill whole batches), a batch forming, no estimate
        due = self._handed_out_at + 0.9 * self._busy_interval - lead_s
        return max(0.0, due - self._clock())

    def put(self, item: T, timeout: float | None = None, *, priority: bool = False, live: bool = False) -> bool:
        """Add an item; blocks while full. False on timeout; BatcherClosed after `close()`.

        priority=True: never blocks; the item goes out in the next batch, ahead of everything else.
        live=True: never blocks; the item waits in the live lane (keep it within `live_room()`).
        """
        if live and not priority:
            with self._lock:
                if self._closed:
                    raise BatcherClosed("batcher is closed")
                self._live.append((self._clock(), item))
                self._not_empty.notify()
                return True
        if priority:
            with self._lock:
                if self._closed:
                    raise BatcherClosed("batcher is closed")
                self._urgent.append(item)
                self._not_empty.notify()
                return True
        with self._not_full:
            end = None if timeout is None else time.monotonic() + timeout
            while len(self._items) >= self.maxsize and not self._closed:
                remaining = None if end is None else end - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._not_full.wait(remaining)
            if self._closed:
                raise BatcherClosed("batcher is closed")
            self._items.append((self._clock(), item))
            self._not_empty.notify()
            return True

    def get_batch(self, timeout: float | None = None) -> list[T]:
        """The next batch: waits up to `timeout` for a first item ([] if none), then up to the batch delay
        (counted from that item's arrival) for more, returning early when the batch is full or the batcher
        is closed (a closed batcher still hands out what it holds)."""
        with self._not_empty:
            had_work = bool(self._items or self._live or self._urgent)
            self._forming += 1
            self._forming_started.notify_all()  # the live intake takes its frames now
            try:
                batch = self._form_batch(timeout)
            finally:
                self._forming -= 1
            if batch:
                self._handed_out(busy=had_work)
            return batch

    def _handed_out(self, busy: bool) -> None:
        self._forming_started.notify_all()
        now = self._clock()
        if busy and self._handed_out_at is not None:  # the consumer came back with work waiting: a batch's time
            interval = now - self._handed_out_at
            self._busy_interval = interval if self._busy_interval is None \
                else 0.7 * self._busy_interval + 0.3 * interval
        self._handed_out_at = now

    def _form_batch(self, timeout: float | None) -> list[T]:
        """get_batch's work, with the lock held."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self._items and not self._live and not self._urgent:
            if self._closed:
                return []
            remaining = None if end is None else end - time.monotonic()
            if remaining is not None and remaining <= 0:
                return []
            self._not_empty.wait(remaining)
        if not self._urgent:
            first = min(lane[0][0] for lane in (self._items, self._live) if lane)
            deadline = first + self.max_batch_delay_s
            while len(self._items) + len(self._live) < self.max_batch_size and not self._closed \
                    and not self._urgent:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                self._not_empty.wait(remaining)
        if not self._urgent and self.live_incoming() > 0:
            hold = self._clock() + self.max_batch_delay_s
            while self.live_incoming() > 0 and not self._closed and not self._urgent:
                remaining = hold - self._clock()
                if remaining <= 0:
                    break
                self._not_empty.wait(remaining)
        if self._urgent:
            return [self._urgent.popleft() for _ in range(min(self.max_batch_size, len(self._urgent)))]
        batch, from_backlog = self._take_shared(self.max_batch_size)
        if from_backlog:
            self._not_full.notify(from_backlog)
        return batch

    def _take_shared(self, count: int) -> tuple[list[T], int]:
        """Up to `count` items from the live lane and the backlog by weighted round-robin (lock held); also
        returns how many came from the backlog."""
        batch: list[T] = []
        from_backlog = 0
        live_stride, backlog_stride = 1.0 / self.live_share, 1.0 / (1.0 - self.live_share)
        while len(batch) < count and (self._live or self._items):
            if self._live and (not self._items or self._live_pass <= self._backlog_pass):
                now = self._live_pass
                batch.append(self._live.popleft()[1])
                self._live_pass += live_stride
            else:
                now = self._backlog_pass
                batch.append(self._items.popleft()[1])
                self._backlog_pass += backlog_stride
                from_backlog += 1
            # A lane with nothing waiting earns no credit meanwhile: it catches up with the lane being served.
            if not self._live:
                self._live_pass = max(self._live_pass, now)
            if not self._items:
                self._backlog_pass = max(self._backlog_pass, now)
        base = min(self._live_pass, self._backlog_pass)  # keep the virtual times small
        self._live_pass -= base
        self._backlog_pass -= base
        return batch, from_backlog

    def close(self) -> None:
        """No more puts; consumers drain what is left, then get []."""
        with self._lock:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()
