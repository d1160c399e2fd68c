"""Dynamic batching: gather up to `max_batch_size` items, waiting at most `max_batch_delay` after the first.

The delay is measured from when the batch's first item was *put*, so an item never waits in the batcher longer
than the delay (plus the time the consumer was busy). The queue is bounded: `put` blocks (back-pressure) or times
out. The clock is injectable for tests.

Priority items (`put(item, priority=True)`: frames a PLC triggered and waits for) skip the queue: the next batch
is made of them alone and is handed out at once, without waiting for the batch to fill. They do not count
against `maxsize` (their callers bound them), so back-pressure from free-running sources never delays them.
"""

from __future__ import annotations

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
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, not {max_batch_size}")
        if max_batch_delay_s < 0:
            raise ValueError(f"max_batch_delay_s must be >= 0, not {max_batch_delay_s}")
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.maxsize = max(maxsize, max_batch_size)
        self._clock = clock
        self._items: deque[tuple[float, T]] = deque()
        self._urgent: deque[T] = deque()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._closed = False

    def __len__(self) -> int:
        with self._lock:
            return len(self._items) + len(self._urgent)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: T, timeout: float | None = None, *, priority: bool = False) -> bool:
        """Add an item; blocks while full. False on timeout; BatcherClosed after `close()`.

        priority=True: never blocks; the item goes out in the next batch, ahead of everything else.
        """
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
            end = None if timeout is None else time.monotonic() + timeout
            while not self._items and not self._urgent:
                if self._closed:
                    return []
                remaining = None if end is None else end - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return []
                self._not_empty.wait(remaining)
            if not self._urgent:
                deadline = self._items[0][0] + self.max_batch_delay_s
                while len(self._items) < self.max_batch_size and not self._closed and not self._urgent:
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        break
                    self._not_empty.wait(remaining)
            if self._urgent:
                return [self._urgent.popleft() for _ in range(min(self.max_batch_size, len(self._urgent)))]
            count = min(self.max_batch_size, len(self._items))
            batch = [self._items.popleft()[1] for _ in range(count)]
            self._not_full.notify(count)
            return batch

    def close(self) -> None:
        """No more puts; consumers drain what is left, then get []."""
        with self._lock:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()
