"""Property (issue 9): random bytes, names, sizes and fields through the folder and Redis sources; the source
stays alive and every input ends in exactly one inspections or rejected_frames row (dead letters included)."""

from __future__ import annotations

import fnmatch
import itertools
import os
import uuid

import cv2
import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from adapters.db import Inspection, RejectedFrame
from adapters.sources import build_source
from adapters.sources.completeness import missing_part
from adapters.sources.folder import IGNORED_PATTERNS
from adapters.sources.redis_stream import RedisFrameWriter
from tests.daemon.test_pipeline import BrightnessDetector
from tests.hardening.helpers import make_pipeline
from tests.waiting import wait_until

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def images() -> st.SearchStrategy[bytes]:
    """Valid small PNG/JPEG images of random sizes, random bytes, and truncated/damaged images."""
    def encode(args):
        ext, width, height, value = args
        return cv2.imencode(ext, np.full((height, width, 3), value, np.uint8))[1].tobytes()

    valid = st.tuples(st.sampled_from([".png", ".jpg", ".bmp"]), st.integers(1, 40), st.integers(1, 40),
                      st.integers(0, 255)).map(encode)
    damaged = st.tuples(valid, st.integers(0, 200)).map(lambda v: v[0][: max(0, len(v[0]) - v[1])])
    return st.one_of(valid, damaged, st.binary(max_size=300))


def count_rows(sessions) -> int:
    with sessions() as session:
        return (session.scalar(select(func.count()).select_from(Inspection))
                + session.scalar(select(func.count()).select_from(RejectedFrame)))


@pytest.fixture
def folder_pipeline(sqlite_sessions, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    source = build_source({"id": "inbox", "kind": "folder", "uri": str(inbox), "settle_s": 0.0,
                           "poll_interval_s": 0.02, "complete_wait_s": 0.0}, queue_size=16)
    pipeline = make_pipeline(sqlite_sessions, tmp_path, [source], BrightnessDetector())
    pipeline.start()
    source.start()
    yield inbox, source, pipeline
    source.stop()
    pipeline.stop(10)


_counter = itertools.count()
_names = st.binary(min_size=1, max_size=60).map(lambda raw: raw.replace(b"/", b"_").replace(b"\0", b"_"))


@given(inputs=st.lists(st.tuples(_names, images()), min_size=1, max_size=5))
@SETTINGS
def test_folder_source_survives_random_files(folder_pipeline, sqlite_sessions, inputs):
    inbox, source, pipeline = folder_pipeline
    before = count_rows(sqlite_sessions)
    written = set()
    incomplete = set()  # rejected as incomplete: left in place, read again should they change
    for raw_name, data in inputs:
        name = f"{next(_counter):05d}_".encode() + raw_name
        if any(fnmatch.fnmatch(os.fsdecode(name), pattern) for pattern in IGNORED_PATTERNS):
            continue
        # written under an ignored name and renamed: with settle_s = 0 the source could otherwise read the file
        # between its creation and its write (empty: rejected and moved, where a truncated image stays in place)
        final = os.path.join(os.fsencode(inbox), name)
        with open(final + b".part", "wb") as handle:
            handle.write(data)
        os.replace(final + b".part", final)
        written.add(name)
        if missing_part(data) is not None:
            incomplete.add(name)
    assert wait_until(lambda: count_rows(sqlite_sessions) == before + len(written), 30), \
        (count_rows(sqlite_sessions) - before, written, source.last_error)
    # every other input moved
    assert wait_until(lambda: set(os.listdir(os.fsencode(inbox))) & written == incomplete, 30)
    assert source.running and source.crashes == 0 and not pipeline.errors


@pytest.fixture
def redis_pipeline(sqlite_sessions, tmp_path, redis_server):
    stream = f"frames:{uuid.uuid4().hex[:8]}"
    source = build_source({"id": "w", "kind": "redis", "block_ms": 50}, queue_size=16, redis_url=redis_server.url,
                          redis_stream=stream, redis_group="workers", consumer_name="c1")
    pipeline = make_pipeline(sqlite_sessions, tmp_path, [source], BrightnessDetector())
    pipeline.start()
    source.start()
    yield RedisFrameWriter(redis_server.url, stream), source, pipeline, stream
    source.stop()
    pipeline.stop(10)
    redis.Redis.from_url(redis_server.url).delete(stream)


_text = st.text(max_size=300)


@pytest.mark.services
@given(entries=st.lists(st.tuples(images(), st.one_of(st.none(), _text), _text, _text, _text), min_size=1,
                        max_size=4))
@SETTINGS
def test_redis_source_survives_random_entries(redis_pipeline, sqlite_sessions, redis_server, entries):
    writer, source, pipeline, stream = redis_pipeline
    before = count_rows(sqlite_sessions)
    for data, frame_id, source_id, line, ts in entries:
        unique = None if frame_id is None else f"{next(_counter):05d}:{frame_id}"  # one row per input
        writer.client.xadd(stream, {"data": data, **({"frame_id": unique} if unique is not None else {}),
                                    "source": source_id, "line": line, "ts": ts})
    client = redis.Redis.from_url(redis_server.url)
    assert wait_until(lambda: count_rows(sqlite_sessions) == before + len(entries), 30), \
        (count_rows(sqlite_sessions) - before, len(entries), source.last_error, pipeline.errors)
    assert wait_until(lambda: client.xpending(stream, "workers")["pending"] == 0, 30)  # all acknowledged
    assert source.running and source.crashes == 0 and not pipeline.errors
