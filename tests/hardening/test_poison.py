"""Poison containment (issue 9, cases 1-3): no single input stops a source, no frame loops forever, values are
fitted to their columns, and input-decided source ids do not become metric labels."""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone

import pytest
import redis
from sqlalchemy import create_engine, text

from adapters.db import make_engine, make_session_factory, upgrade
from adapters.sources import build_source
from adapters.sources.redis_stream import RedisFrameWriter
from tests.daemon.test_pipeline import BrightnessDetector, ConstantDetector, png
from tests.hardening.helpers import RedeliveringSource, make_pipeline, rows
from tests.waiting import wait_until


def folder(inbox, **options):
    return build_source({"id": "inbox", "kind": "folder", "uri": str(inbox), "line": "L1", "settle_s": 0.05,
                         "poll_interval_s": 0.05, **options}, queue_size=8)


def test_case1_non_utf8_file_name_is_inspected_and_the_source_keeps_going(sqlite_sessions, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with open(os.path.join(os.fsencode(inbox), b"cam1_\xff.png"), "wb") as handle:
        handle.write(png(200))
    source = folder(inbox)
    pipeline = make_pipeline(sqlite_sessions, tmp_path, [source], BrightnessDetector())
    pipeline.start()
    source.start()
    try:
        assert wait_until(lambda: pipeline.processed == 1, 20), source.last_error
        (inbox / "later.png").write_bytes(png(10))  # the source is still alive after the odd name
        assert wait_until(lambda: pipeline.processed == 2, 20), source.last_error
    finally:
        source.stop()
        pipeline.stop(10)
    inspections, rejected = rows(sqlite_sessions)
    assert not rejected and source.running is False and source.crashes == 0
    names = sorted(row.frame_name for row in inspections.values())
    assert names[0].endswith("cam1_\\xff.png") and names[1].endswith("later.png")
    assert os.listdir(os.fsencode(inbox / "processed")) and b"cam1_\xff.png" in os.listdir(
        os.fsencode(inbox / "processed"))


def test_an_exception_making_a_frame_becomes_a_rejected_row_and_the_input_moves(sqlite_sessions, tmp_path,
                                                                              monkeypatch):
    from adapters.sources.folder import FolderSource

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "poison.png").write_bytes(png(100))
    (inbox / "fine.png").write_bytes(png(100))
    real = FolderSource._make_frame

    def make_frame(self, rel, st):
        if rel == "poison.png":
            raise RuntimeError("boom in the frame builder")
        return real(self, rel, st)

    monkeypatch.setattr(FolderSource, "_make_frame", make_frame)
    source = folder(inbox)
    pipeline = make_pipeline(sqlite_sessions, tmp_path, [source], BrightnessDetector())
    pipeline.start()
    source.start()
    try:
        assert wait_until(lambda: pipeline.processed == 1 and pipeline.rejected == 1, 20)
        assert wait_until(lambda: not (inbox / "poison.png").exists())
    finally:
        source.stop()
        pipeline.stop(10)
    _, rejected = rows(sqlite_sessions)
    (row,) = rejected.values()
    assert "RuntimeError: boom in the frame builder" in row.reason and row.name.endswith("poison.png")
    assert (inbox / "processed" / "poison.png").exists()


def test_an_unexpected_exception_in_the_loop_restarts_the_source_with_backoff(tmp_path, monkeypatch):
    from adapters.sources.folder import FolderSource

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    calls = {"n": 0}
    real = FolderSource._ready_files

    def flaky(self):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise KeyError("a bug in the loop")
        return real(self)

    monkeypatch.setattr(FolderSource, "_ready_files", flaky)
    source = folder(inbox, restart_initial_s=0.05)
    source.start()
    try:
        (inbox / "a.png").write_bytes(png(1))
        frame = source.queue.get(timeout=20)
        assert frame is not None and frame.name.endswith("a.png")
        assert source.crashes == 2 and "KeyError" in source.last_error and source.running
        assert source.counters.snapshot()["reconnects"] == 2
    finally:
        source.stop()


@pytest.fixture
def stream(redis_server):
    name = f"frames:{uuid.uuid4().hex[:8]}"
    yield name
    redis.Redis.from_url(redis_server.url).delete(name)


def redis_source(redis_server, stream):
    return build_source({"id": "w", "kind": "redis", "block_ms": 100, "claim_idle_ms": 2000}, queue_size=8,
                        redis_url=redis_server.url, redis_stream=stream, redis_group="workers", consumer_name="c1")


@pytest.mark.services
def test_case2_redis_ts_overflow_and_future_ts_do_not_kill_the_worker(sqlite_sessions, tmp_path, redis_server,
                                                                     stream):
    writer = RedisFrameWriter(redis_server.url, stream)
    writer.append(png(50), frame_id="overflow", source="w", ts="0001-01-01T00:00:00+14:00")
    writer.append(png(50), frame_id="future", source="w", ts="9999-12-31T23:59:59Z")
    writer.append(png(50), frame_id="fine", source="w", ts="2026-05-01T12:00:00Z")
    source = redis_source(redis_server, stream)
    pipeline = make_pipeline(sqlite_sessions, tmp_path, [source], BrightnessDetector())
    pipeline.start()
    source.start()
    try:
        assert wait_until(lambda: pipeline.processed == 3, 20), source.last_error
        client = redis.Redis.from_url(redis_server.url)
        assert wait_until(lambda: client.xpending(stream, "workers")["pending"] == 0)
    finally:
        source.stop()
        pipeline.stop(10)
    inspections, _ = rows(sqlite_sessions)
    now = datetime.now(timezone.utc)
    assert abs((inspections["overflow"].captured_at - now).total_seconds()) < 60  # arrival time
    assert abs((inspections["future"].captured_at - now).total_seconds()) < 60  # clamped, not year 9999
    assert inspections["fine"].captured_at == datetime(2026, 5, 1, 12, tzinfo=timezone.utc)
    assert source.crashes == 0 and "future" in source.last_error


def pg_sessions(postgres):
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    engine = make_engine(postgres.url.rsplit("/", 1)[0] + f"/{name}")
    upgrade(engine)
    return engine, make_session_factory(engine)


@pytest.mark.services
def test_case3_over_long_values_on_postgresql_are_fitted_not_looped(tmp_path, postgres, redis_server, stream):
    engine, sessions = pg_sessions(postgres)
    long_source, long_id = "s" * 200, "f" * 300
    writer = RedisFrameWriter(redis_server.url, stream)
    writer.append(png(50), frame_id=long_id, source=long_source, line="L" * 300, ts="2026-05-01T12:00:00Z")
    writer.append(b"not an image", frame_id=long_id + "x", source=long_source, ts="2026-05-01T12:00:00Z")
    writer.append(png(60), frame_id="nul\0id", source="w", ts="2026-05-01T12:00:00Z")
    source = redis_source(redis_server, stream)
    pipeline = make_pipeline(sessions, tmp_path, [source], BrightnessDetector())
    pipeline.start()
    source.start()
    try:
        assert wait_until(lambda: pipeline.processed == 2 and pipeline.rejected == 1, 20), pipeline.errors
        client = redis.Redis.from_url(redis_server.url)
        assert wait_until(lambda: client.xpending(stream, "workers")["pending"] == 0)
    finally:
        source.stop()
        pipeline.stop(10)
    inspections, rejected = rows(sessions)
    assert pipeline.failed == 0
    (long_row,) = [row for row in inspections.values() if row.frame_id.startswith("fff")]
    assert len(long_row.frame_id) == 255 and len(long_row.source) == 128 and len(long_row.line) == 128
    assert any(frame_id.startswith("nulid~") for frame_id in inspections)  # NUL dropped, the id kept distinct
    (bad,) = rejected.values()
    assert len(bad.frame_id) == 255 and bad.frame_id != long_row.frame_id and len(bad.source) == 128
    metrics = pipeline.metrics.render().decode()
    assert long_source not in metrics and 'source="other"' in metrics  # no unbounded label
    engine.dispose()


def test_a_frame_failing_to_persist_is_dead_lettered_after_max_attempts(sqlite_sessions, tmp_path):
    source = RedeliveringSource()
    pipeline = make_pipeline(sqlite_sessions, tmp_path, [source], ConstantDetector(0.1), max_attempts=3)

    def broken_write(key, *args, **kwargs):  # a fault of this frame (a disk-full is waited out, never counted)
        raise ValueError("cannot encode this frame's heatmap")

    pipeline.store.write = broken_write
    pipeline.start()
    try:
        source.push("doomed", png(10))
        assert wait_until(lambda: source.acked.get("doomed"), 20)
    finally:
        pipeline.stop(10)
    assert source.deliveries["doomed"] == 3  # never loops beyond max_attempts
    _, rejected = rows(sqlite_sessions)
    assert rejected["doomed"].reason.startswith("dead letter: failed 3 times, last at the persist stage: ValueError")
    assert 'anomalyd_frames_dead_lettered_total{source="cam"} 1.0' in pipeline.metrics.render().decode()
