"""Explicit identity (issue 9, case 13): identical MQTT payloads are distinct captures, a Redis producer reusing
a frame_id for other content is recorded as a conflict, FIFOs and subfolders in the inbox get a record, and a
capture time far in the future is clamped."""

from __future__ import annotations

import os
import time
import uuid
from datetime import datetime, timezone

import pytest
import redis

from adapters.sources import build_source
from adapters.sources.redis_stream import RedisFrameWriter
from tests.adapters.test_sources_mqtt import Publisher, mqtt_source, wait_online
from tests.daemon.test_pipeline import BrightnessDetector, png
from tests.hardening.helpers import make_pipeline, rows
from tests.waiting import take, wait_until

pytestmark = pytest.mark.services


def test_case13_identical_mqtt_payloads_are_two_inspections_and_a_producer_id_wins(sqlite_sessions, tmp_path,
                                                                                  mosquitto):
    prefix = f"t{uuid.uuid4().hex[:6]}"
    source = mqtt_source(mosquitto, prefix, f"src-{prefix}")
    pipeline = make_pipeline(sqlite_sessions, tmp_path, [source], BrightnessDetector())
    pipeline.start()
    source.start()
    publisher = Publisher(mosquitto.port)
    try:
        wait_online(source)  # online once the broker granted the subscription (SUBACK)
        same = png(77)
        publisher.publish(f"{prefix}/cam1/image", same)
        publisher.publish(f"{prefix}/cam1/image", same)  # a static scene: a second capture, same bytes
        publisher.publish(f"{prefix}/cam1/image", png(78), frame_id="cam1:000042")
        assert wait_until(lambda: pipeline.processed == 3, 20), (pipeline.processed, pipeline.rejected, pipeline.failed, pipeline.errors, source.last_error)
    finally:
        publisher.close()
        source.stop()
        pipeline.stop(10)
    inspections, rejected = rows(sqlite_sessions)
    assert len(inspections) == 3 and not rejected and "cam1:000042" in inspections


@pytest.fixture
def stream(redis_server):
    name = f"frames:{uuid.uuid4().hex[:8]}"
    yield name
    redis.Redis.from_url(redis_server.url).delete(name)


def test_case13_a_reused_redis_frame_id_with_other_content_is_a_conflict(sqlite_sessions, tmp_path, redis_server,
                                                                       stream):
    writer = RedisFrameWriter(redis_server.url, stream)
    source = build_source({"id": "w", "kind": "redis", "block_ms": 100}, queue_size=8, redis_url=redis_server.url,
                          redis_stream=stream, redis_group="workers", consumer_name="c1")
    pipeline = make_pipeline(sqlite_sessions, tmp_path, [source], BrightnessDetector())
    pipeline.start()
    source.start()
    try:
        writer.append(png(10), frame_id="cam1:7", source="w")
        assert wait_until(lambda: pipeline.processed == 1, 20)
        writer.append(png(10), frame_id="cam1:7", source="w")  # the same capture sent again: a redelivery
        writer.append(png(200), frame_id="cam1:7", source="w")  # another image under the same id
        assert wait_until(lambda: pipeline.rejected == 1, 20)
        client = redis.Redis.from_url(redis_server.url)
        assert wait_until(lambda: client.xpending(stream, "workers")["pending"] == 0)
    finally:
        source.stop()
        pipeline.stop(10)
    inspections, rejected = rows(sqlite_sessions)
    assert list(inspections) == ["cam1:7"] and pipeline.processed == 1
    (conflict,) = rejected.values()
    assert conflict.reason.startswith("frame_id conflict: 'cam1:7' was already inspected")


def test_case13_fifos_and_subfolders_in_the_inbox_are_recorded_once_and_left(sqlite_sessions, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    os.mkfifo(inbox / "pipe.png")
    (inbox / "sub").mkdir()
    (inbox / "sub" / "inside.png").write_bytes(png(5))
    (inbox / "fine.png").write_bytes(png(5))
    source = build_source({"id": "inbox", "kind": "folder", "uri": str(inbox), "settle_s": 0.05,
                           "poll_interval_s": 0.05}, queue_size=8)
    pipeline = make_pipeline(sqlite_sessions, tmp_path, [source], BrightnessDetector())
    pipeline.start()
    source.start()
    try:
        assert wait_until(lambda: pipeline.processed == 1 and pipeline.rejected == 2, 20)
        time.sleep(0.5)  # many more polls: no second record
    finally:
        source.stop()
        pipeline.stop(10)
    _, rejected = rows(sqlite_sessions)
    reasons = sorted(r.reason for r in rejected.values())
    assert len(reasons) == 2 and pipeline.rejected == 2
    assert "pipe.png is not a regular file" in reasons[0] and "sub is a folder" in reasons[1]
    assert (inbox / "pipe.png").exists() and (inbox / "sub" / "inside.png").exists()


def test_case13_a_capture_time_far_in_the_future_is_clamped(tmp_path):
    (tmp_path / "future.png").write_bytes(png(5))
    far = datetime(9999, 12, 31, tzinfo=timezone.utc).timestamp()
    os.utime(tmp_path / "future.png", (far, far))
    source = build_source({"id": "inbox", "kind": "folder", "uri": str(tmp_path), "settle_s": 0.05,
                           "poll_interval_s": 0.05}, queue_size=8)
    source.start()
    try:
        (frame,) = take(source, 1)
    finally:
        source.stop()
    assert abs((frame.captured_at - datetime.now(timezone.utc)).total_seconds()) < 60
    assert "in the future" in frame.meta["ts_error"]
