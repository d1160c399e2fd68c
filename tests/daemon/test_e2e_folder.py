"""End to end: real Mosquitto + SQLite + folder source, real inspection samples and bad files.

Every valid frame → exactly one row and its artifact files; every bad file → one rejected row; every anomalous
frame → exactly one alert received by a real subscriber with the contract payload. Plus `anomalyd run` as a
subprocess stopped with SIGTERM (exit 0, `stopped` on the availability topic).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from sqlalchemy import func, select

from adapters.db import (
    Inspection,
    OutboxMessage,
    RejectedFrame,
    count_pending_outbox,
    make_engine,
    make_session_factory,
)
from daemon.config.settings import load_config
from daemon.process.service import Service
from tests.adapters.test_mqtt import Subscriber
from tests.daemon.test_pipeline import BrightnessDetector
from tests.waiting import wait_until

pytestmark = [pytest.mark.services, pytest.mark.shared]

REPO = Path(__file__).resolve().parents[2]
THRESHOLD = 0.4


def fake_detector_factory(settings):
    """For `anomalyd run --detector-factory`: a fake detector instead of the [model] section."""
    return BrightnessDetector(image_size=64)


def write_config(tmp_path: Path, broker_port: int, grace: float = 20) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(f"""
[runtime]
max_batch_size = 8
max_batch_delay_ms = 10
queue_size = 32
shutdown_grace_s = {grace}
[[sources]]
id = "inbox"
kind = "folder"
uri = "inbox"
line = "line1"
threshold = {THRESHOLD}
settle_s = 0.05
poll_interval_s = 0.05
[mqtt]
host = "127.0.0.1"
port = {broker_port}
client_id = "anomalyd-e2e-{os.getpid()}-{tmp_path.name[-6:]}"
[database]
url = "sqlite:///var/anomalyd.db"
[storage]
dir = "var/artifacts"
[api]
bind = "127.0.0.1:0"
""")
    (tmp_path / "inbox").mkdir()
    return config


def sample_files(samples_dir: Path, count: int) -> list[Path]:
    files = sorted(p for p in samples_dir.rglob("*") if p.suffix.lower() in (".png", ".jpg")
                   and "ground_truth" not in p.parts)
    step = max(1, len(files) // count)
    return files[::step][:count]


def bad_files(inbox: Path) -> tuple[set[str], set[str]]:
    """Writes odd-but-valid and invalid files; returns (valid names, rejected names)."""
    rng = np.random.default_rng(0)
    cv2.imwrite(str(inbox / "bad_16bit.png"), (rng.random((64, 80, 3)) * 65535).astype(np.uint16))
    cv2.imwrite(str(inbox / "bad_gray.png"), (rng.random((64, 80)) * 255).astype(np.uint8))
    cv2.imwrite(str(inbox / "bad_rgba.png"), (rng.random((64, 80, 4)) * 255).astype(np.uint8))
    _ok, jpeg = cv2.imencode(".jpg", (rng.random((64, 80, 3)) * 255).astype(np.uint8))
    (inbox / "bad_corrupt.jpg").write_bytes(jpeg.tobytes()[: len(jpeg) // 3])
    (inbox / "bad_empty.png").write_bytes(b"")
    return {"bad_16bit.png", "bad_gray.png", "bad_rgba.png"}, {"bad_corrupt.jpg", "bad_empty.png"}




def test_folder_to_database_artifacts_and_alerts(tmp_path, samples_dir, mosquitto):
    config = write_config(tmp_path, mosquitto.port)
    inbox = tmp_path / "inbox"
    samples = sample_files(samples_dir, 200)
    assert len(samples) == 200
    for index, path in enumerate(samples):
        shutil.copyfile(path, inbox / f"{index:03d}_{path.parent.name}_{path.name}")
    valid_bad, rejected_bad = bad_files(inbox)
    subscriber = Subscriber(mosquitto.port, "anomalyd/line1/inbox/#")
    service = Service(load_config(config, environ={}), detector=BrightnessDetector(image_size=64))
    service.start()
    try:
        total = len(samples) + len(valid_bad) + len(rejected_bad)
        assert wait_until(lambda: service.pipeline.processed + service.pipeline.rejected >= total, 120), \
            f"{service.pipeline.processed} + {service.pipeline.rejected} of {total}"
        ready = httpx.get(f"http://127.0.0.1:{service.http_port}/api/health/ready", timeout=30)
        assert ready.status_code == 200 and ready.json()["details"]["mqtt"]["connected"] is True
        metrics = httpx.get(f"http://127.0.0.1:{service.http_port}/metrics", timeout=30).text
        assert 'anomalyd_frames_in_total{source="inbox"}' in metrics
        assert "anomalyd_batch_size_bucket" in metrics
        assert service.publisher.flush(30)
    finally:
        service.stop()
    sessions = make_session_factory(make_engine(f"sqlite:///{tmp_path}/var/anomalyd.db"))
    with sessions() as session:
        rows = session.scalars(select(Inspection)).all()
        names = sorted(Path(row.frame_name).name for row in rows)
        assert len(rows) == len(samples) + len(valid_bad)
        assert len(set(names)) == len(names)  # exactly one row per frame
        assert valid_bad <= set(names)
        for row in rows:
            for relative in (row.mask_path, row.heatmap_path, row.frame_path):
                assert (tmp_path / "var" / "artifacts" / relative).is_file()
        gray = next(row for row in rows if row.frame_name.endswith("bad_gray.png"))
        assert (gray.width, gray.height) == (80, 64)
        rejected = {Path(r.name).name: r.reason for r in session.scalars(select(RejectedFrame))}
        assert set(rejected) == rejected_bad
        anomalous = {row.id: row for row in rows if row.is_anomalous}
        assert 0 < len(anomalous) < len(rows)
        assert all(row.score >= THRESHOLD for row in anomalous.values())
        assert session.scalar(select(func.count()).select_from(OutboxMessage)) == len(anomalous)
        assert count_pending_outbox(session) == 0  # MQTT's cursor is past every alert: all acknowledged
    # Both kinds of message: the last one the broker forwards to us may be an inspection after the last alert.
    assert wait_until(lambda: len(subscriber.payloads("/anomaly")) >= len(anomalous)
                      and len(subscriber.payloads("/inspection")) >= len(rows), 30)
    alerts = subscriber.payloads("/anomaly")
    by_inspection = {}
    for alert in alerts:
        by_inspection.setdefault(alert["inspection_id"], set()).add(alert["id"])
    assert set(by_inspection) == set(anomalous)
    assert all(len(ids) == 1 for ids in by_inspection.values())  # one alert per anomalous frame
    for alert in alerts:
        row = anomalous[alert["inspection_id"]]
        assert alert["frame_id"] == row.frame_id and alert["score"] == pytest.approx(row.score, abs=1e-5)
        assert alert["threshold"] == THRESHOLD and alert["source"] == "inbox" and alert["line"] == "line1"
        assert alert["heatmap_url"] == f"/api/inspections/{row.id}/heatmap.jpg"
    assert len(subscriber.payloads("/inspection")) == len(rows)
    # every file was moved to processed/, but the truncated JPEG: rejected as incomplete and left in place, to be
    # read again should its writer resume (docs/ingest.md)
    assert [path.name for path in inbox.glob("*.*")] == ["bad_corrupt.jpg"]
    assert "looks incomplete" in rejected["bad_corrupt.jpg"]
    subscriber.close()


def test_anomalyd_run_subprocess_stops_on_sigterm(tmp_path, samples_dir, mosquitto):
    config = write_config(tmp_path, mosquitto.port, grace=15)
    for index, path in enumerate(sample_files(samples_dir, 10)):
        shutil.copyfile(path, tmp_path / "inbox" / f"{index:03d}{path.suffix}")
    subscriber = Subscriber(mosquitto.port, "anomalyd/available")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "run", "--config", str(config),
         "--detector-factory", "tests.daemon.test_e2e_folder:fake_detector_factory"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_until(lambda: len(list((tmp_path / "inbox" / "processed").glob("*"))) == 10
                          or process.poll() is not None, 120)
        assert process.poll() is None, process.stdout.read()
        assert wait_until(lambda: "online" in subscriber.texts("anomalyd/available"), 20)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "HTTP API on http://127.0.0.1:" in output and "anomalyd stopped" in output
    assert wait_until(lambda: subscriber.texts("anomalyd/available")[-1:] == ["stopped"], 30)
    subscriber.close()
    engine = make_engine(f"sqlite:///{tmp_path}/var/anomalyd.db")
    with make_session_factory(engine)() as session:
        assert session.scalar(select(func.count()).select_from(Inspection)) == 10
    engine.dispose()
