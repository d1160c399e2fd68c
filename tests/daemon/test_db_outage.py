"""A database restart loses nothing: PostgreSQL is stopped mid-run and started again; every frame from the
folder inbox ends with exactly one row (failed writes hand the frame back to its source, which retries it)."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from sqlalchemy import select

from adapters.db import Inspection, make_engine, make_session_factory
from daemon.config.settings import load_config
from daemon.process.service import Service
from tests.daemon.test_pipeline import BrightnessDetector
from tests.waiting import wait_until

pytestmark = pytest.mark.services


class SlowDetector(BrightnessDetector):
    """Spreads the run over a few seconds so the outage falls in the middle of it."""

    def predict(self, images, class_names=None):
        time.sleep(0.05)
        return super().predict(images, class_names)


def write_frames(inbox: Path, start: int, count: int) -> list[str]:
    rng = np.random.default_rng(start)
    names = []
    for index in range(start, start + count):
        name = f"{index:03d}.png"
        cv2.imwrite(str(inbox / name), (rng.random((48, 64, 3)) * 255).astype(np.uint8))
        names.append(name)
    return names


def test_postgres_restart_loses_no_frame(tmp_path, private_postgres):
    server = private_postgres
    url = server.create_database("outage")
    (tmp_path / "inbox").mkdir()
    (tmp_path / "config.toml").write_text(f"""
[runtime]
max_batch_size = 4
max_batch_delay_ms = 10
[[sources]]
id = "inbox"
kind = "folder"
uri = "inbox"
line = "line1"
threshold = 0.9
settle_s = 0.05
poll_interval_s = 0.05
retry_s = 0.5
[mqtt]
enabled = false
[database]
url = "{url}"
[storage]
dir = "artifacts"
save_frames = false
[api]
enabled = false
""")
    inbox = tmp_path / "inbox"
    names = write_frames(inbox, 0, 30)
    service = Service(load_config(tmp_path / "config.toml", environ={}), detector=SlowDetector(image_size=32))
    service.start()
    try:
        assert wait_until(lambda: service.pipeline.processed >= 5, 30)
        server.stop()
        names += write_frames(inbox, 30, 20)  # arrive while the database is down
        assert wait_until(lambda: service.pipeline.failed > 0, 30), "no write failed during the outage"
        ready, details = service.readiness()
        assert not ready and details["database"]["reachable"] is False
        server.start()
        processed = inbox / "processed"
        assert wait_until(lambda: processed.is_dir() and len(list(processed.iterdir())) == len(names), 60), \
            f"{len(list(processed.iterdir())) if processed.is_dir() else 0} of {len(names)} files processed"
        assert service.readiness()[0]
    finally:
        service.stop()
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as session:
            rows = session.scalars(select(Inspection)).all()
    finally:
        engine.dispose()
    stored = sorted(Path(row.frame_name).name for row in rows)
    assert stored == sorted(names)  # every frame, exactly once
