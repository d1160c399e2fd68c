"""Scale-out, capture side: a `--role capture` service forwards its folder source's frames to the Redis stream
(keeping the capture source's id and line), and a `--role worker` service elsewhere inspects them. Every file ends
as exactly one row: an inspection, or a `rejected_frames` row for a file the worker cannot decode."""

from __future__ import annotations

import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import redis
from sqlalchemy import select

from adapters.db import Inspection, RejectedFrame, make_engine, make_session_factory
from adapters.sources import parse_source_settings
from adapters.sources.base import Frame
from adapters.sources.redis_stream import RedisFrameWriter, RedisStreamSource
from adapters.timeutil import utc_now
from daemon.config.settings import load_config
from daemon.process.service import Service
from tests.daemon.test_pipeline import BrightnessDetector
from tests.waiting import wait_until

pytestmark = pytest.mark.services


def capture_config(tmp_path: Path, redis_url: str, stream: str) -> Path:
    path = tmp_path / "capture.toml"
    path.write_text(f"""
[[sources]]
id = "cam1"
kind = "folder"
uri = "inbox"
line = "line2"
settle_s = 0.05
poll_interval_s = 0.05
[redis]
url = "{redis_url}"
stream = "{stream}"
[mqtt]
enabled = false
[api]
enabled = false
""")
    return path


def worker_config(tmp_path: Path, redis_url: str, stream: str) -> Path:
    path = tmp_path / "worker.toml"
    path.write_text(f"""
[runtime]
max_batch_size = 4
max_batch_delay_ms = 10
[[sources]]
id = "frames"
kind = "redis"
line = "default"
threshold = 0.9
block_ms = 100
[redis]
url = "{redis_url}"
stream = "{stream}"
group = "workers"
[database]
url = "sqlite:///{tmp_path}/worker.db"
[storage]
dir = "{tmp_path}/artifacts"
save_frames = false
[mqtt]
enabled = false
[api]
enabled = false
""")
    return path


def test_capture_host_forwards_frames_that_a_worker_inspects(tmp_path, redis_server):
    stream = f"capture:{uuid.uuid4().hex[:8]}"
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    rng = np.random.default_rng(0)
    names = []
    for index in range(6):
        name = f"{index:02d}.png"
        cv2.imwrite(str(inbox / name), (rng.random((40, 56, 3)) * 255).astype(np.uint8))
        names.append(name)
    (inbox / "empty.png").write_bytes(b"")

    capture = Service(load_config(capture_config(tmp_path, redis_server.url, stream), environ={}), role="capture")
    capture.start()
    try:
        assert capture.pipeline is None and capture.engine is None  # no model, no database on a capture host
        processed = inbox / "processed"
        assert wait_until(lambda: processed.is_dir() and len(list(processed.iterdir())) == 7, 30), \
            f"forwarded: {sorted(p.name for p in processed.iterdir()) if processed.is_dir() else []}"
    finally:
        capture.stop()
    client = redis.Redis.from_url(redis_server.url)
    assert client.xlen(stream) == 7
    first = client.xrange(stream, count=1)[0][1]
    assert first[b"source"] == b"cam1" and first[b"line"] == b"line2"

    worker = Service(load_config(worker_config(tmp_path, redis_server.url, stream), environ={}), role="worker",
                     detector=BrightnessDetector(image_size=32))
    worker.start()
    try:
        assert wait_until(lambda: worker.pipeline.processed + worker.pipeline.rejected >= 7, 30)
        assert wait_until(lambda: client.xpending(stream, "workers")["pending"] == 0, 30)
    finally:
        worker.stop()
    engine = make_engine(f"sqlite:///{tmp_path}/worker.db")
    try:
        with make_session_factory(engine)() as session:
            rows = session.scalars(select(Inspection)).all()
            rejected = session.scalars(select(RejectedFrame)).all()
    finally:
        engine.dispose()
    assert sorted(Path(row.frame_name).name for row in rows) == names
    assert {(row.source, row.line) for row in rows} == {("cam1", "line2")}  # the capture source, not "frames"
    assert len(rejected) == 1 and rejected[0].name.endswith("empty.png") and "empty" in rejected[0].reason


def test_unreadable_capture_frame_reaches_the_worker_as_a_rejection(tmp_path, redis_server):
    """A frame the capture host could not read is forwarded with its error, not dropped there."""
    stream = f"capture:{uuid.uuid4().hex[:8]}"
    writer = RedisFrameWriter(redis_server.url, stream)
    unreadable = Frame(frame_id="cam9:1", source_id="cam9", captured_at=utc_now(), data=None, name="/mnt/cam9/1.jpg",
                       meta={"error": "cannot read /mnt/cam9/1.jpg: Input/output error"})
    odd = Frame(frame_id="cam9:2", source_id="cam9", captured_at=utc_now(), image=np.zeros((4, 4, 3), np.float64),
                name="cam9 frame 2")
    writer.append_frame(unreadable)
    writer.append_frame(odd)
    writer.close()

    source = RedisStreamSource(parse_source_settings(dict(id="frames", kind="redis", uri=redis_server.url,
                                                                options={"stream": stream, "block_ms": 100})))
    source.start()
    try:
        frames = [source.queue.get(timeout=30) for _ in range(2)]
    finally:
        source.stop()
    assert [frame.data for frame in frames] == [None, None]
    assert frames[0].meta["error"] == "cannot read /mnt/cam9/1.jpg: Input/output error"
    assert "cannot JPEG-encode" in frames[1].meta["error"] and "float64" in frames[1].meta["error"]
