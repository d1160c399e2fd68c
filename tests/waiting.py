"""Polling helpers shared by the tests: wait for a condition, take frames from a source's queue."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.05) -> bool:
    """True as soon as predicate() is truthy; False if it is still falsy after `timeout` seconds (generous by
    default: a busy 2-core CI machine can take many seconds for what takes milliseconds here)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def take(source: Any, n: int, timeout: float = 60) -> list[Any]:
    """The next n frames from source.queue; fails the test naming how many arrived."""
    frames = []
    for _ in range(n):
        frame = source.queue.get(timeout=timeout)
        assert frame is not None, f"{source.id}: only {len(frames)} of {n} frames arrived"
        frames.append(frame)
    return frames
