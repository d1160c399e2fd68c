"""OpenCV capture source: video files (every frame, in order, RGB; loop), unreachable streams (offline,
capped reconnect backoff, prompt stop)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from adapters.sources import SourceContext, build_source
from tests.services import free_port
from tests.waiting import wait_until

N_FRAMES = 8
ROOT = Path(__file__).resolve().parents[2]


def red_level(i: int) -> int:
    return 20 + 25 * i


@pytest.fixture
def video_path(tmp_path):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    assert writer.isOpened()
    for i in range(N_FRAMES):
        bgr = np.zeros((48, 64, 3), np.uint8)
        bgr[..., 2] = red_level(i)  # red in BGR order
        bgr[..., 0] = 200  # blue
        writer.write(bgr)
    writer.release()
    return path




def test_video_file_emits_every_frame_in_order_as_rgb(video_path):
    statuses = []
    source = build_source({"id": "vid", "kind": "video", "uri": str(video_path), "line": "L2"}, queue_size=2,
                          on_status=lambda s, st: statuses.append(st.value))
    assert source.queue.policy == "all"
    source.start()
    try:
        frames = [source.queue.get(timeout=20) for _ in range(N_FRAMES)]  # queue of 2: back-pressure, no drops
        assert all(f is not None for f in frames)
        assert source.finished.wait(20)
    finally:
        source.stop()
    assert [f.frame_id for f in frames] == [f"vid:clip.avi:{i}" for i in range(N_FRAMES)]
    for i, frame in enumerate(frames):
        assert frame.image.shape == (48, 64, 3) and frame.image.dtype == np.uint8
        red, _, blue = frame.image.reshape(-1, 3).mean(axis=0)
        assert abs(red - red_level(i)) < 8 and abs(blue - 200) < 8  # RGB order
        assert frame.meta["line"] == "L2" and frame.meta["frame_index"] == i
    assert source.queue.get(timeout=0) is None
    assert source.counters.frames_in == N_FRAMES and source.counters.frames_dropped == 0
    assert statuses[0] == "online" and statuses[-1] == "offline"
    assert source.status.value == "offline"


def test_video_loop_gives_new_ids_per_pass(video_path):
    source = build_source({"id": "vid", "kind": "video", "uri": str(video_path), "loop": True}, queue_size=4)
    source.start()
    try:
        ids = [source.queue.get(timeout=20).frame_id for _ in range(N_FRAMES + 2)]
    finally:
        source.stop()
    assert ids[N_FRAMES - 1] == f"vid:clip.avi:{N_FRAMES - 1}"
    assert ids[N_FRAMES:] == ["vid:clip.avi#1:0", "vid:clip.avi#1:1"]
    assert not source.finished.is_set()


def test_unreachable_rtsp_goes_offline_and_reconnects_with_capped_backoff():
    url = f"rtsp://127.0.0.1:{free_port()}/x"
    source = build_source({"id": "cam", "kind": "rtsp", "uri": url, "backoff_initial_s": 0.05,
                           "backoff_max_s": 0.2, "open_timeout_ms": 2000})
    assert source.queue.policy == "latest"
    source.start()
    try:
        assert wait_until(lambda: source.counters.reconnects >= 4), source.counters
        assert source.status.value == "offline"
        assert source.counters.errors >= 4 and "cannot open rtsp" in source.last_error
        assert source.backoff.current == 0.2  # 0.05, 0.1, 0.2, 0.2: capped
    finally:
        source.stop(timeout=5)
    assert not source.running
    assert source.queue.get(timeout=0) is None


def test_missing_video_file_is_an_error_not_a_crash(tmp_path):
    source = build_source({"id": "vid", "kind": "video", "uri": str(tmp_path / "nope.avi"),
                           "backoff_initial_s": 0.05, "backoff_max_s": 0.1})
    source.start()
    try:
        assert wait_until(lambda: source.counters.errors >= 2)
        assert "does not exist" in source.last_error and "nope.avi" in source.last_error
    finally:
        source.stop()
    assert not source.running


def test_watchdog_replaces_a_stuck_grabber(video_path, monkeypatch):
    """A backend call that hangs despite the timeouts: the source goes offline and starts a fresh grabber."""
    from adapters.sources import opencv_capture

    hang = [True]
    real_open = opencv_capture.OpenCVCaptureSource._open

    def open_or_hang(self):
        if hang[0]:
            hang[0] = False
            time.sleep(3)  # stuck (longer than the watchdog below)
        return real_open(self)

    monkeypatch.setattr(opencv_capture.OpenCVCaptureSource, "_open", open_or_hang)
    # watchdog_s leaves the fresh grabber room to open and read on a busy machine (at 0.3 s, a stall that long
    # there would count as a second stuck grabber); the hang above is still far longer.
    source = build_source({"id": "vid", "kind": "video", "uri": str(video_path), "watchdog_s": 1.0,
                           "open_timeout_ms": 200, "backoff_initial_s": 0.05})
    source.start()
    try:
        first = source.queue.get(timeout=20)
        assert first is not None and first.frame_id == "vid:clip.avi:0"
        assert source.counters.reconnects == 1 and "watchdog" in source.last_error
    finally:
        source.stop()


def test_video_resumes_after_the_last_recorded_frame(video_path):
    """A restarted daemon: frames 0-4 are in the database, so the file continues at frame 5."""
    asked = []

    def recorded(source_id, prefix):
        asked.append((source_id, prefix))
        # newest first, in any order; other files of the same source and other sources do not count
        return ["vid:clip.avi:3", "vid:clip.avi:4", "vid:clip.avi:0", "vid:clip.avi.bak:7"]

    source = build_source({"id": "vid", "kind": "video", "uri": str(video_path)},
                          SourceContext(queue_size=2, recorded_frame_ids=recorded))
    source.start()
    try:
        frames = [source.queue.get(timeout=20) for _ in range(N_FRAMES - 5)]
        assert source.finished.wait(20)
    finally:
        source.stop()
    assert asked == [("vid", "vid:clip.avi")]
    assert [f.frame_id for f in frames] == [f"vid:clip.avi:{i}" for i in range(5, N_FRAMES)]
    red = frames[0].image.reshape(-1, 3).mean(axis=0)[0]
    assert abs(red - red_level(5)) < 8  # the pixels of frame 5, not just its id
    assert source.queue.get(timeout=0) is None and source.counters.frames_in == N_FRAMES - 5


def test_video_fully_recorded_finishes_without_frames_and_a_failing_lookup_starts_over(video_path):
    finished = build_source({"id": "vid", "kind": "video", "uri": str(video_path)},
                            SourceContext(queue_size=2, recorded_frame_ids=lambda *_: [f"vid:clip.avi:{N_FRAMES - 1}"]))
    finished.start()
    try:
        assert finished.finished.wait(20)
    finally:
        finished.stop()
    assert finished.counters.frames_in == 0 and finished.queue.get(timeout=0) is None

    done = build_source({"id": "vid", "kind": "video", "uri": str(video_path), "loop": True},
                        SourceContext(queue_size=2, recorded_frame_ids=lambda *_: ["vid:clip.avi#1:1"]))
    done.start()
    try:
        assert done.queue.get(timeout=20).frame_id == "vid:clip.avi#1:2"  # looping: pass 1 continues at frame 2
    finally:
        done.stop()

    def broken(*_):
        raise RuntimeError("database is locked")

    source = build_source({"id": "vid", "kind": "video", "uri": str(video_path)},
                          SourceContext(queue_size=N_FRAMES, recorded_frame_ids=broken))
    source.start()
    try:
        assert source.finished.wait(20)
    finally:
        source.stop()
    assert source.counters.frames_in == N_FRAMES and source.queue.get(timeout=0).frame_id == "vid:clip.avi:0"


def test_opencv_messages_stay_out_of_stderr_and_failures_are_clear_in_log_and_status(tmp_path):
    """A bad RTSP uri (with a password) and a file that is no video: OpenCV/FFmpeg print nothing raw on stderr
    (`[ WARN:...]`, `[tcp @ 0x...]`); the source's log line and last_error say what failed, password masked."""
    garbage = tmp_path / "broken.avi"
    garbage.write_bytes(b"not a video" * 100)
    url = f"rtsp://viewer:s3cret@127.0.0.1:{free_port()}/stream"
    script = f"""
import logging, sys, time
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="LOG %(name)s %(message)s")
from adapters.sources import build_source
sources = [build_source({{"id": "cam", "kind": "rtsp", "uri": {url!r}, "open_timeout_ms": 1000,
                          "backoff_initial_s": 0.05, "backoff_max_s": 0.1}}),
           build_source({{"id": "vid", "kind": "video", "uri": {str(garbage)!r},
                          "backoff_initial_s": 0.05, "backoff_max_s": 0.1}})]
for source in sources:
    source.start()
deadline = time.monotonic() + 30
while time.monotonic() < deadline and not all(s.counters.errors >= 2 for s in sources):
    time.sleep(0.05)
for source in sources:
    source.stop()
    print("STATUS", source.id, source.status.value, source.last_error)
"""
    env = {key: value for key, value in os.environ.items() if not key.startswith("OPENCV_")}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    stderr_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert stderr_lines and all(line.startswith("LOG ") for line in stderr_lines), result.stderr  # nothing raw
    assert "s3cret" not in result.stderr + result.stdout
    shown = url.replace("s3cret", "***")
    assert f"STATUS cam offline cannot open rtsp '{shown}' with FFMPEG: unreachable" in result.stdout, result.stdout
    assert f"STATUS vid offline cannot open video '{garbage}' with FFMPEG: not a video" in result.stdout
    assert f"source cam: cannot open rtsp '{shown}'" in result.stderr


def test_display_uri_masks_the_password_and_the_query():
    from adapters.sources.opencv_capture import display_uri

    assert display_uri("rtsp://admin:pw@10.0.0.5:554/live?x=1") == "rtsp://admin:***@10.0.0.5:554/live?***"
    assert display_uri("http://cam/snapshot.jpg?token=abc") == "http://cam/snapshot.jpg?***"
    assert display_uri("rtsp://10.0.0.5/live") == "rtsp://10.0.0.5/live"
    assert display_uri("http://user@cam/mjpg") == "http://user@cam/mjpg"
    assert display_uri("/videos/a:b@c.avi") == "/videos/a:b@c.avi"
