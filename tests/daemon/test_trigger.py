"""Trigger controller and the batcher's priority lane, without the daemon: bad input is refused with a code, floods
are bounded, stale frames are skipped, the first answer wins, and triggered items jump the batch queue."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from adapters.sources.base import Frame
from daemon.frames.batcher import DynamicBatcher
from daemon.plant.trigger import TriggerController, TriggerError, TriggerSettings
from tests.waiting import wait_until


def controller(deadline_s: float | None = None, max_pending: int = 2, answers: list | None = None,
               start: bool = True):
    """start=False: the deadline thread is started by the test (when a deadline must not pass too early)."""
    answers = answers if answers is not None else []
    settings = {"press": TriggerSettings("press", "l1", "opcua", deadline_s=deadline_s, fail_safe="no_decision",
                                         max_pending=max_pending)}
    triggers = TriggerController(settings, known_sources={"press", "belt"}, on_answer=answers.append)
    if start:
        triggers.start()
    return triggers, answers


def frame(captured_at: datetime, frame_id: str = "f") -> Frame:
    return Frame(frame_id=frame_id, source_id="press", captured_at=captured_at, meta={"line": "l1"})


@pytest.mark.parametrize("source, part_id, channel, code", [
    ("press", 1.5, "opcua", "bad_part_id"),
    ("press", None, "opcua", "bad_part_id"),
    ("press", True, "opcua", "bad_part_id"),
    ("press", {"a": 1}, "opcua", "bad_part_id"),
    ("press", "", "opcua", "bad_part_id"),
    ("press", "x" * 129, "opcua", "bad_part_id"),
    ("press", "line\nbreak", "opcua", "bad_part_id"),
    ("press", "P-1", "mqtt", "wrong_channel"),
    ("belt", "P-1", "opcua", "not_triggered"),
    ("nosuch", "P-1", "opcua", "unknown_source"),
])
def test_bad_triggers_are_refused_with_a_code(source, part_id, channel, code):
    triggers, _ = controller()
    try:
        with pytest.raises(TriggerError) as refused:
            triggers.request(source, part_id, channel)
        assert refused.value.code == code and refused.value.as_dict()["status"] == "error"
        assert triggers.pending("press") == 0
    finally:
        triggers.stop()


def test_flood_is_bounded_and_integer_part_ids_are_accepted():
    triggers, _ = controller(max_pending=2)
    try:
        first = triggers.request("press", 17, "opcua")
        assert first.part_id == "17"
        triggers.request("press", "P-2", "opcua")
        for _ in range(50):
            with pytest.raises(TriggerError, match="already has 2"):
                triggers.request("press", "P-x", "opcua")
        assert triggers.counts("press") == {"requested": 2, "deadline_missed": 0, "refused": 50, "stale_discarded": 0,
                                            "pending": 2}
    finally:
        triggers.stop()


def test_stale_frames_are_skipped_and_the_fresh_one_is_tagged():
    triggers, answers = controller()
    try:
        request = triggers.request("press", "P-1", "opcua")
        assert triggers.waiting("press") is request
        stale = frame(request.requested_at - timedelta(milliseconds=5), "old")
        assert not triggers.attach(request, stale) and "trigger_id" not in stale.meta
        fresh = frame(datetime.now(timezone.utc), "new")
        assert triggers.attach(request, fresh)
        assert fresh.meta == {"line": "l1", "trigger_id": request.id, "part_id": "P-1"}
        assert triggers.waiting("press") is None
        triggers.committed(SimpleNamespace(id=7, meta=dict(fresh.meta), is_anomalous=False, frame_id="new",
                                           score=0.1, threshold=0.5, regions=[], model_version="v"))
        [answer] = answers
        assert answer.result == "OK" and not answer.fail_safe and not answer.late
        assert answer.payload()["inspection_id"] == 7 and answer.payload()["part_id"] == "P-1"
        assert triggers.pending("press") == 0
    finally:
        triggers.stop()


def test_deadline_gives_the_fail_safe_once_then_the_late_result():
    triggers, answers = controller(deadline_s=0.05, start=False)
    try:
        request = triggers.request("press", "P-1", "opcua")
        fresh = frame(datetime.now(timezone.utc))
        assert triggers.attach(request, fresh)
        triggers.start()  # deadlines are watched from now on: the frame was attached in time, however slow the machine
        assert wait_until(lambda: answers, 20)
        time.sleep(0.1)
        assert [a.result for a in answers] == ["no_decision"] and answers[0].fail_safe
        assert triggers.counts("press")["deadline_missed"] == 1
        triggers.committed(SimpleNamespace(id=8, meta=dict(fresh.meta), is_anomalous=True, frame_id="f",
                                           score=0.9, threshold=0.5, regions=[{}], model_version="v"))
        assert [(a.result, a.late) for a in answers] == [("no_decision", False), ("NG", True)]
        # a request that never got a frame is dropped at its deadline (the part is gone)
        triggers.request("press", "P-2", "opcua")
        assert wait_until(lambda: len(answers) == 3, 20)
        assert triggers.waiting("press") is None and triggers.pending("press") == 0
    finally:
        triggers.stop()


def test_failed_triggered_frame_answers_the_fail_safe_at_once():
    triggers, answers = controller(deadline_s=30)
    try:
        request = triggers.request("press", "P-1", "opcua")
        fresh = frame(datetime.now(timezone.utc))
        triggers.attach(request, fresh)
        triggers.frame_failed(fresh, "rejected: not an image")
        assert [(a.result, a.fail_safe, a.reason) for a in answers] == [("no_decision", True, "rejected: not an image")]
    finally:
        triggers.stop()


def test_priority_items_skip_the_queue_and_the_batch_wait():
    batcher: DynamicBatcher[str] = DynamicBatcher(max_batch_size=4, max_batch_delay_s=5.0, maxsize=4)
    for index in range(4):
        batcher.put(f"free-{index}")
    assert not batcher.put("blocked", timeout=0.01)  # full for free-running items...
    batcher.put("urgent", priority=True)  # ...but never for a triggered one
    assert len(batcher) == 5
    assert batcher.get_batch(timeout=1) == ["urgent"]
    assert batcher.get_batch(timeout=1) == [f"free-{i}" for i in range(4)]
    got: list[list[str]] = []
    batcher.put("slow-fill")  # a batch waiting (5 s delay) to fill up...
    thread = threading.Thread(target=lambda: got.append(batcher.get_batch(timeout=1)))
    thread.start()
    time.sleep(0.1)
    started = time.monotonic()
    batcher.put("urgent-2", priority=True)  # ...is cut short by a triggered item, which goes first
    thread.join(10)
    assert got == [["urgent-2"]] and time.monotonic() - started < 2.5  # not after the 5 s batch delay
    batcher.close()  # a closed batcher hands out what it holds at once
    assert batcher.get_batch(timeout=0) == ["slow-fill"]


def test_stale_frames_of_a_triggered_source_are_counted_and_logged_not_dropped_silently(sqlite_sessions, tmp_path,
                                                                                      caplog):
    """Issue 18 (9c): frames captured before the trigger are discarded with a log line and a count."""
    import logging

    from tests.daemon.test_pipeline import BrightnessDetector, png
    from tests.hardening.helpers import RedeliveringSource, make_pipeline

    caplog.set_level(logging.INFO, logger="anomalyd.trigger")
    source = RedeliveringSource("press")
    pipeline = make_pipeline(sqlite_sessions, tmp_path, [source], BrightnessDetector())
    triggers, _ = controller()
    pipeline.triggers = triggers
    pipeline.start()
    try:
        for index in range(3):  # captured while no trigger waits
            source.push(f"early{index}", png(10 + index))
        triggers.request("press", "P-1", "opcua")
        source.push("fresh", png(200))
        assert wait_until(lambda: pipeline.processed == 1, 30)
    finally:
        pipeline.stop(10)
        triggers.stop()
    assert source.acked.get("fresh")
    assert triggers.counts("press")["stale_discarded"] == 3
    assert all(source.acked.get(f"early{index}") for index in range(3))  # acknowledged, not redelivered
    lines = [r.getMessage() for r in caplog.records if "discarded uninspected" in r.getMessage()]
    assert len(lines) == 1 and "captured before trigger" in lines[0], lines  # rate-limited: not one per frame
