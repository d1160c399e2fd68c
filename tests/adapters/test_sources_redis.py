"""Redis Streams source and writer against a real Redis: consumer groups share work without overlap, entries of
a dead consumer are claimed after claim_idle_ms, only committed entries are acknowledged, outages reconnect."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone

import pytest
import redis

from adapters.sources import Frame, build_source
from adapters.sources.redis_stream import RedisFrameWriter
from tests.waiting import take, wait_until

pytestmark = pytest.mark.services






@pytest.fixture
def stream(redis_server):
    name = f"frames:{uuid.uuid4().hex[:8]}"
    yield name
    redis.Redis.from_url(redis_server.url).delete(name)


def worker(redis_server, stream, consumer, *, queue_size=16, claim_idle_ms=30000, **options):
    spec = {"id": f"w-{consumer}", "kind": "redis", "claim_idle_ms": claim_idle_ms, "block_ms": 100, **options}
    return build_source(spec, queue_size=queue_size, redis_url=redis_server.url, redis_stream=stream,
                        redis_group="workers", consumer_name=consumer)


def pending_count(redis_server, stream) -> int:
    return redis.Redis.from_url(redis_server.url).xpending(stream, "workers")["pending"]


def produce(redis_server, stream, n: int, prefix: str = "cam1") -> list[str]:
    writer = RedisFrameWriter(redis_server.url, stream)
    ts = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)
    ids = [f"{prefix}:{i}" for i in range(n)]
    for i, frame_id in enumerate(ids):
        writer.append(f"jpeg-{i}".encode(), frame_id=frame_id, source=prefix, line="L1", ts=ts,
                      content_type="image/jpeg", class_name="bottle")
    writer.close()
    return ids


def test_two_consumers_share_entries_without_overlap_and_ack_on_done(redis_server, stream):
    ids = produce(redis_server, stream, 6)  # written before any worker exists: the group starts at id 0
    a = worker(redis_server, stream, "a", queue_size=2)
    a.start()
    try:
        assert wait_until(lambda: len(a.queue) == 2)  # a's queue is full: it reads no more (back-pressure)
        b = worker(redis_server, stream, "b", queue_size=2)
        b.start()
        try:
            got_b = take(b, 4)
            for frame in got_b:
                frame.done(True)
            got_a = take(a, 2)
        finally:
            b.stop()
    finally:
        a.stop()
    assert {f.frame_id for f in got_a}.isdisjoint({f.frame_id for f in got_b})
    assert sorted(f.frame_id for f in got_a + got_b) == sorted(ids)
    first = min(got_a + got_b, key=lambda f: f.frame_id)
    assert first.data == b"jpeg-0" and first.source_id == "cam1" and first.meta["line"] == "L1"
    assert first.meta["class_name"] == "bottle" and first.meta["content_type"] == "image/jpeg"
    assert first.captured_at == datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)
    assert pending_count(redis_server, stream) == 2  # a's two frames were never committed
    for frame in got_a:
        frame.done(True)
    assert pending_count(redis_server, stream) == 0


def test_dead_consumers_entries_are_claimed_with_the_same_frame_id(redis_server, stream):
    ids = produce(redis_server, stream, 3)
    client = redis.Redis.from_url(redis_server.url)
    client.xadd(stream, {"data": b"raw", "source": "cam9"})  # no frame_id: derived from the entry id
    dead = worker(redis_server, stream, "dead", claim_idle_ms=300)
    dead.start()
    held = take(dead, 4)
    dead.stop()  # killed before committing anything
    assert pending_count(redis_server, stream) == 4

    heir = worker(redis_server, stream, "heir", claim_idle_ms=300)
    heir.start()
    try:
        claimed = take(heir, 4)
        assert {f.frame_id for f in claimed} == {f.frame_id for f in held}
        assert {f.meta["delivery"] for f in claimed} == {"claimed"}
        raw = next(f for f in claimed if f.data == b"raw")
        assert raw.frame_id == f"{stream}:{raw.meta['entry_id']}" and raw.source_id == "cam9"
        assert set(ids) < {f.frame_id for f in claimed}
        for frame in claimed:
            frame.done(True)
        assert pending_count(redis_server, stream) == 0
        time.sleep(0.8)  # > claim_idle_ms: acknowledged entries must not come back
        assert heir.queue.get(timeout=0.2) is None
    finally:
        heir.stop()


def test_slow_consumer_keeps_its_entries(redis_server, stream):
    """A live consumer that holds frames longer than claim_idle_ms (slow model) is not robbed by its peers."""
    produce(redis_server, stream, 2)
    # The slow worker refreshes its entries every claim_idle_ms / 3: 1 s leaves its thread 0.67 s of slack on a
    # busy machine (300 ms left it 0.2 s: a thread that late would lose its entries to the peer).
    slow = worker(redis_server, stream, "slow", claim_idle_ms=1000)
    slow.start()
    try:
        assert wait_until(lambda: len(slow.queue) == 2)
        peer = worker(redis_server, stream, "peer", claim_idle_ms=1000)
        peer.start()
        try:
            assert peer.queue.get(timeout=3.0) is None  # 3x claim_idle_ms
        finally:
            peer.stop()
        for frame in take(slow, 2):
            frame.done(True)
    finally:
        slow.stop()
    assert pending_count(redis_server, stream) == 0


def test_not_processed_entry_is_redelivered(redis_server, stream):
    (frame_id,) = produce(redis_server, stream, 1)
    source = worker(redis_server, stream, "w", claim_idle_ms=200)
    source.start()
    try:
        (first,) = take(source, 1)
        first.done(False)
        (again,) = take(source, 1)
        assert again.frame_id == first.frame_id == frame_id
        again.done(True)
    finally:
        source.stop()
    assert pending_count(redis_server, stream) == 0


def test_redis_outage_goes_offline_then_reconnects():
    from tests.services import Redis

    with Redis() as server:
        statuses = []
        source = build_source({"id": "r", "kind": "redis", "block_ms": 100, "backoff_initial_s": 0.05,
                               "backoff_max_s": 0.2}, redis_url=server.url, redis_stream="s",
                              on_status=lambda src, st: statuses.append(st.value))
        source.start()
        try:
            assert wait_until(lambda: source.status.value == "online")
            server.stop()
            assert wait_until(lambda: source.status.value == "offline")
            assert wait_until(lambda: source.counters.reconnects >= 2)
            server.start()  # a fresh, empty Redis (no persistence in tests): the group is re-created
            assert wait_until(lambda: source.status.value == "online")
            writer = RedisFrameWriter(server.url, "s")
            writer.append(b"img", frame_id="after-outage", source="cam")
            (frame,) = take(source, 1)
            assert frame.frame_id == "after-outage"
            frame.done(True)
            writer.close()
        finally:
            source.stop()
        assert statuses[:3] == ["online", "offline", "online"]
        assert source.counters.errors >= 2


def test_writer_forwards_decoded_frames_as_jpeg(redis_server, stream):
    import numpy as np

    writer = RedisFrameWriter(redis_server.url, stream)
    image = np.zeros((16, 16, 3), np.uint8)
    image[..., 0] = 255  # red
    frame = Frame(frame_id="cam:1", source_id="cam", captured_at=datetime.now(timezone.utc), image=image,
                  meta={"line": "L3"})
    writer.append_frame(frame)
    writer.close()
    source = worker(redis_server, stream, "w")
    source.start()
    try:
        (got,) = take(source, 1)
        got.done(True)
    finally:
        source.stop()
    from model.preprocess import decode_image

    decoded = decode_image(got.data)
    assert got.meta["content_type"] == "image/jpeg" and got.meta["line"] == "L3"
    assert decoded[..., 0].mean() > 240 and decoded[..., 2].mean() < 15
