"""FrameQueue policies, Frame.done, SourceSettings parsing, max_fps throttling and backoff of adapters.sources."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

import pytest

from adapters.sources import (
    Backoff,
    Frame,
    FrameQueue,
    SourceCounters,
    Throttle,
    build_source,
    parse_source_settings,
    queue_policy,
)


def make_frame(i: int, calls: list | None = None) -> Frame:
    frame = Frame(frame_id=f"f{i}", source_id="s", captured_at=datetime.now(timezone.utc), data=b"x")
    if calls is not None:
        frame.on_done = lambda ok, i=i: calls.append((i, ok))
    return frame


def test_latest_policy_drops_oldest_counts_and_acks_dropped():
    counters = SourceCounters()
    queue = FrameQueue(2, "latest", counters)
    calls: list = []
    for i in range(5):
        assert queue.put(make_frame(i, calls), timeout=0)
    assert [queue.get(0).frame_id, queue.get(0).frame_id] == ["f3", "f4"]
    assert queue.get(timeout=0) is None
    assert queue.dropped == 3 and counters.frames_dropped == 3
    assert calls == [(0, True), (1, True), (2, True)]  # dropped frames are acknowledged, not redelivered forever


def test_all_policy_never_drops_and_blocks_until_room():
    queue = FrameQueue(2, "all")
    assert queue.put(make_frame(0)) and queue.put(make_frame(1))
    assert queue.put(make_frame(2), timeout=0.05) is False  # full: back-pressure, frame not queued
    assert len(queue) == 2 and queue.dropped == 0

    result = {}
    producer = threading.Thread(target=lambda: result.setdefault("ok", queue.put(make_frame(3), timeout=30)))
    producer.start()
    producer.join(0.1)
    assert producer.is_alive()  # still blocked: nothing consumed yet
    assert queue.get(timeout=1).frame_id == "f0"
    producer.join(30)
    assert result["ok"] is True
    assert [queue.get(0).frame_id for _ in range(2)] == ["f1", "f3"]


def test_close_unblocks_put_and_get_drains():
    queue = FrameQueue(1, "all")
    queue.put(make_frame(0))
    result = {}
    producer = threading.Thread(target=lambda: result.setdefault("ok", queue.put(make_frame(1))))
    producer.start()
    queue.close()
    producer.join(10)
    assert result["ok"] is False
    assert queue.get(timeout=0).frame_id == "f0"
    assert queue.get(timeout=None) is None  # closed and empty: no hang


def test_frame_done_calls_once_and_swallows_errors():
    calls: list = []
    frame = make_frame(0, calls)
    frame.done(True)
    frame.done(False)
    assert calls == [(0, True)]

    def boom(ok):
        raise RuntimeError("ack failed")

    failing = Frame(frame_id="x", source_id="s", captured_at=datetime.now(timezone.utc), on_done=boom)
    failing.done(True)  # logged, not raised


def test_source_settings_from_mapping():
    spec = parse_source_settings({"id": "cam1", "kind": "RTSP", "uri": "rtsp://h/x", "line": "L1",
                                    "loop": True, "options": {"read_timeout_ms": 100}})
    assert spec.kind == "rtsp" and spec.line == "L1"
    assert spec.options == {"loop": True, "read_timeout_ms": 100}
    assert queue_policy(spec) == "latest"
    assert queue_policy(parse_source_settings({"id": "in", "kind": "folder", "uri": "/x"})) == "all"
    assert queue_policy(parse_source_settings({"id": "c", "kind": "camera", "uri": "0", "policy": "all"})) == "all"
    with pytest.raises(ValueError, match="unknown kind 'webcam'"):
        parse_source_settings({"id": "x", "kind": "webcam"})
    with pytest.raises(ValueError, match="policy"):
        parse_source_settings({"id": "x", "kind": "folder", "policy": "newest"})
    with pytest.raises(ValueError, match="no 'id'"):
        parse_source_settings({"kind": "folder"})


def test_build_source_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match="after must be one of"):
        build_source({"id": "in", "kind": "folder", "uri": str(tmp_path), "after": "shred"})
    with pytest.raises(ValueError, match="needs a Redis url"):
        build_source({"id": "r", "kind": "redis"})
    with pytest.raises(ValueError, match="mqtt://host:port/topic"):
        build_source({"id": "m", "kind": "mqtt", "uri": "http://broker/x"})


def test_disabled_source_starts_no_thread(tmp_path):
    statuses = []
    source = build_source({"id": "in", "kind": "folder", "uri": str(tmp_path), "enabled": False},
                          on_status=lambda s, st: statuses.append(st.value))
    source.start()
    assert source.status.value == "disabled" and not source.running
    assert statuses == ["disabled"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_throttle_paces_to_max_fps():
    clock = FakeClock()
    throttle = Throttle(4.0, clock)  # one frame per 0.25 s
    assert throttle.ready()
    throttle.mark()
    assert not throttle.ready() and throttle.delay() == pytest.approx(0.25)
    clock.now += 0.1
    assert throttle.delay() == pytest.approx(0.15)
    clock.now += 0.15
    assert throttle.ready()
    throttle.mark()
    clock.now += 10  # a long pause does not earn a burst
    throttle.mark()
    assert throttle.delay() == pytest.approx(0.25)
    unlimited = Throttle(0, clock)
    unlimited.mark()
    assert unlimited.ready()


def test_backoff_is_exponential_and_capped():
    backoff = Backoff(0.5, 4.0)
    assert [backoff.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    backoff.reset()
    assert backoff.next() == 0.5


def test_max_fps_slows_a_folder_source(tmp_path):
    """Generous lower bound only: 5 files at max_fps=10 cannot take less than 4 intervals (0.4 s)."""
    for i in range(5):
        (tmp_path / f"{i}.bin").write_bytes(b"x")
    source = build_source({"id": "in", "kind": "folder", "uri": str(tmp_path), "max_fps": 10, "settle_s": 0,
                           "poll_interval_s": 0.05}, queue_size=10)
    start = time.monotonic()
    source.start()
    try:
        for _ in range(5):
            assert source.queue.get(timeout=30) is not None
        assert time.monotonic() - start >= 0.39
    finally:
        source.stop()
