"""DynamicBatcher: size bound, delay bound counted from the first item, back-pressure, close/drain."""

from __future__ import annotations

import threading
import time

import pytest

from daemon.frames.batcher import BatcherClosed, DynamicBatcher


def test_full_batch_is_returned_without_waiting_for_the_delay():
    batcher = DynamicBatcher(4, max_batch_delay_s=60.0)
    for item in range(10):
        batcher.put(item)
    assert batcher.get_batch(timeout=1) == [0, 1, 2, 3]
    assert batcher.get_batch(timeout=1) == [4, 5, 6, 7]
    assert len(batcher) == 2


def test_partial_batch_waits_for_the_delay_after_the_first_item():
    clock = [100.0]
    batcher = DynamicBatcher(8, max_batch_delay_s=5.0, clock=lambda: clock[0])
    batcher.put("a")
    result: list = []
    consumer = threading.Thread(target=lambda: result.append(batcher.get_batch(timeout=5)))
    consumer.start()
    time.sleep(0.05)
    clock[0] = 103.0  # 3 s of the 5 s delay passed: still waiting
    batcher.put("b")
    time.sleep(0.05)
    assert consumer.is_alive()
    clock[0] = 105.0  # delay over (counted from "a"): the next wake-up returns the partial batch
    batcher.put("c")
    consumer.join(5)
    assert not consumer.is_alive()
    assert result == [["a", "b", "c"]]


def test_zero_delay_returns_what_is_there():
    batcher = DynamicBatcher(8, max_batch_delay_s=0.0)
    batcher.put(1)
    batcher.put(2)
    assert batcher.get_batch(timeout=1) == [1, 2]
    assert batcher.get_batch(timeout=0.01) == []


def test_put_blocks_when_full_and_times_out():
    batcher = DynamicBatcher(2, max_batch_delay_s=0.0, maxsize=2)
    assert batcher.put(1) and batcher.put(2)
    assert batcher.put(3, timeout=0.05) is False
    assert batcher.get_batch(timeout=1) == [1, 2]
    assert batcher.put(3, timeout=0.05) is True


def test_close_drains_then_ends():
    batcher = DynamicBatcher(4, max_batch_delay_s=60.0)
    batcher.put("x")
    batcher.close()
    assert batcher.get_batch(timeout=1) == ["x"]  # no waiting for the delay once closed
    assert batcher.get_batch(timeout=1) == []
    with pytest.raises(BatcherClosed):
        batcher.put("y")


def test_invalid_bounds():
    with pytest.raises(ValueError):
        DynamicBatcher(0, 0.01)
    with pytest.raises(ValueError):
        DynamicBatcher(1, -1)
