"""Issue 10: a restarted daemon resumes a video file after the last frame already in the database instead of
running the whole file through the model again."""

from __future__ import annotations

import cv2
import numpy as np
from sqlalchemy import func, select

from adapters.db import Inspection
from daemon.config.settings import load_config
from daemon.process.service import Service
from tests.daemon.test_pipeline import BrightnessDetector
from tests.waiting import wait_until

N_FRAMES = 6


def write_video(path, n_frames: int) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (32, 24))
    assert writer.isOpened()
    for index in range(n_frames):
        writer.write(np.full((24, 32, 3), 30 * index, np.uint8))
    writer.release()


def write_config(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("""
[runtime]
max_batch_delay_ms = 5
[[sources]]
id = "film"
kind = "video"
uri = "clip.avi"
[mqtt]
enabled = false
[database]
url = "sqlite:///var/anomalyd.db"
[storage]
dir = "var/artifacts"
save_frames = false
[api]
enabled = false
""")
    return config


def run_until_finished(config, expected_rows: int) -> tuple[int, int]:
    """(frames the source emitted, rows in the database) after the video source finished."""
    service = Service(load_config(config, environ={}), detector=BrightnessDetector(image_size=32))
    service.start()
    try:
        source = service.sources[0]
        assert source.finished.wait(30)
        assert wait_until(lambda: _rows(service) >= expected_rows, 30), _rows(service)
        emitted = source.counters.frames_in
    finally:
        service.stop()
    return emitted, _rows(service)


def _rows(service: Service) -> int:
    with service.sessions() as session:
        return session.scalar(select(func.count()).select_from(Inspection))


def test_a_restarted_daemon_resumes_a_video_after_its_last_inspected_frame(tmp_path):
    config = write_config(tmp_path)
    write_video(tmp_path / "clip.avi", N_FRAMES)
    assert run_until_finished(config, N_FRAMES) == (N_FRAMES, N_FRAMES)
    assert run_until_finished(config, N_FRAMES) == (0, N_FRAMES)  # nothing inferred again

    write_video(tmp_path / "clip.avi", N_FRAMES + 3)  # the file grew (a recorder appending): only the new frames
    assert run_until_finished(config, N_FRAMES + 3) == (3, N_FRAMES + 3)
