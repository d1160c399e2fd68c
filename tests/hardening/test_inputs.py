"""Slow writers (case 8) and damaged JPEGs (case 9): a half-written file is retried, not rejected and moved; a
JPEG libjpeg warns about is a rejected frame naming the damage, never a scored frame."""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest

from adapters.sources import build_source
from model.preprocess import ImageDecodeError, decode_image
from tests.daemon.test_pipeline import BrightnessDetector
from tests.hardening.helpers import RedeliveringSource, make_pipeline, rows
from tests.waiting import wait_until


def photo_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur((rng.random((240, 320, 3)) * 255).astype(np.uint8), (9, 9), 3)
    return cv2.imencode(".jpg", image)[1].tobytes()


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_case8_a_slow_writer_pausing_longer_than_settle_s_loses_nothing(sqlite_sessions, tmp_path, ext):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    data = photo_jpeg() if ext == ".jpg" else cv2.imencode(".png", np.full((64, 64, 3), 90, np.uint8))[1].tobytes()
    source = build_source({"id": "inbox", "kind": "folder", "uri": str(inbox), "settle_s": 0.1,
                           "poll_interval_s": 0.05}, queue_size=8)
    pipeline = make_pipeline(sqlite_sessions, tmp_path, [source], BrightnessDetector())
    pipeline.start()
    source.start()

    def slow_writer() -> None:
        with open(inbox / f"slow{ext}", "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
            time.sleep(1.5)  # much longer than settle_s
            handle.write(data[len(data) // 2:])

    writer = threading.Thread(target=slow_writer)
    writer.start()
    try:
        writer.join()
        assert wait_until(lambda: pipeline.processed == 1, 20)
    finally:
        source.stop()
        pipeline.stop(10)
    inspections, rejected = rows(sqlite_sessions)
    assert not rejected and len(inspections) == 1
    assert (inbox / "processed" / f"slow{ext}").read_bytes() == data


def test_case8_a_truncated_file_nobody_finishes_is_rejected_after_complete_wait_s(sqlite_sessions, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    data = photo_jpeg()
    source = build_source({"id": "inbox", "kind": "folder", "uri": str(inbox), "settle_s": 0.05,
                           "poll_interval_s": 0.05, "complete_wait_s": 2.0}, queue_size=8)
    pipeline = make_pipeline(sqlite_sessions, tmp_path, [source], BrightnessDetector())
    pipeline.start()
    source.start()
    try:
        # Written once the daemon runs: complete_wait_s counts from the file's mtime, and a slow start on a busy
        # machine must not eat the time the check below relies on.
        (inbox / "abandoned.jpg").write_bytes(data[: len(data) // 2])
        time.sleep(0.5)
        assert pipeline.rejected == 0  # still given time to finish
        assert wait_until(lambda: pipeline.rejected == 1, 20)
    finally:
        source.stop()
        pipeline.stop(10)
    # Left in place (read again should it change: tests/hardening/test_slow_writers.py), not moved for good.
    assert (inbox / "abandoned.jpg").exists() and not (inbox / "processed" / "abandoned.jpg").exists()


def damaged_jpegs() -> dict[str, bytes]:
    data = photo_jpeg()
    half = len(data) // 2
    middle = bytearray(data)
    middle[half:half + 200] = np.random.default_rng(1).integers(0, 256, 200, dtype=np.uint8).tobytes()
    return {
        "truncated, padded with zeros": data[:half] + b"\0" * half,
        "truncated, padded with zeros and an end marker": data[:half] + b"\0" * half + b"\xff\xd9",
        "truncated with an end marker": data[:half] + b"\xff\xd9",
        "corrupt middle": bytes(middle),
    }


@pytest.mark.parametrize("kind", list(damaged_jpegs()))
def test_case9_damaged_jpegs_are_decode_failures_with_the_reason(kind):
    with pytest.raises(ImageDecodeError, match=r"cam\.jpg: not a readable image \((damaged JPEG: )?.*"):
        decode_image(damaged_jpegs()[kind], "cam.jpg")


def test_case9_damaged_jpegs_become_rejected_rows_not_inspections(sqlite_sessions, tmp_path):
    source = RedeliveringSource()
    pipeline = make_pipeline(sqlite_sessions, tmp_path, [source], BrightnessDetector())
    pipeline.start()
    try:
        for index, data in enumerate(damaged_jpegs().values()):
            source.push(f"bad-{index}", data)
        source.push("good", photo_jpeg())
        assert wait_until(lambda: pipeline.processed + pipeline.rejected == 5, 20)
    finally:
        pipeline.stop(10)
    inspections, rejected = rows(sqlite_sessions)
    assert set(inspections) == {"good"} and len(rejected) == 4
    assert all("Corrupt JPEG data" in r.reason or "Premature end" in r.reason or "truncated" in r.reason
               for r in rejected.values()), [r.reason for r in rejected.values()]
