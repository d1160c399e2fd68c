"""No good frame is ever given up on a resource fault (issue 18, finding 2): with the artifacts disk full (ENOSPC
injected at the file-system call the artifact store writes through) for longer than max_attempts retries, every
valid frame is inspected once space returns and none is dead-lettered; readiness answers 503 naming the fault
while it lasts and 200 after, and the fault is logged and counted. A poison input still is dead-lettered."""

from __future__ import annotations

import errno
import logging

import httpx
from sqlalchemy import func, select

import adapters.storage as storage_module
from adapters.db import Inspection, RejectedFrame
from daemon.config.settings import load_config
from daemon.frames.dead_letter import resource_fault
from daemon.process.service import Service
from tests.daemon.test_pipeline import BrightnessDetector, png
from tests.waiting import wait_until

FRAMES = 8


def start_service(tmp_path) -> Service:
    (tmp_path / "inbox").mkdir()
    (tmp_path / "config.toml").write_text(f"""
[runtime]
max_batch_size = 4
max_batch_delay_ms = 10
max_attempts = 3
resource_backoff_s = 0.05
resource_fault_hold_s = 600
[[sources]]
id = "inbox"
kind = "folder"
uri = "inbox"
line = "line1"
settle_s = 0.05
poll_interval_s = 0.05
retry_s = 0.05
[mqtt]
enabled = false
[database]
url = "sqlite:///{tmp_path}/anomalyd.db"
[storage]
dir = "artifacts"
[api]
bind = "127.0.0.1:0"
""")
    service = Service(load_config(tmp_path / "config.toml", environ={}), detector=BrightnessDetector())
    service.start()
    return service


def ready(service: Service) -> tuple[int, dict]:
    response = httpx.get(f"http://127.0.0.1:{service.http_port}/api/health/ready", timeout=10)
    return response.status_code, response.json()


def counts(service: Service) -> tuple[int, int]:
    with service.sessions() as session:
        return (session.scalar(select(func.count()).select_from(Inspection)),
                session.scalar(select(func.count()).select_from(RejectedFrame)))


def test_resource_faults_are_told_from_poison():
    from sqlalchemy.exc import OperationalError

    assert resource_fault(OSError(errno.ENOSPC, "No space left on device")) == "disk full"
    assert resource_fault(OSError(errno.EDQUOT, "Disk quota exceeded")) == "disk quota exceeded"
    assert resource_fault(OSError(errno.EROFS, "Read-only file system")) == "file system read-only"
    assert resource_fault(MemoryError()) == "out of memory"
    assert resource_fault(OperationalError("SELECT 1", {}, Exception("connection refused"))) == \
        "database unavailable"
    try:  # wrapped by a library: the cause still tells
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("cannot encode the heatmap") from inner
    except RuntimeError as wrapped:
        assert resource_fault(wrapped) == "disk full"
    assert resource_fault(OSError("cannot identify image file")) is None  # the input's own fault
    assert resource_fault(ValueError("bad value")) is None


def test_a_full_artifacts_disk_is_waited_out_and_no_valid_frame_is_dead_lettered(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING)
    service = start_service(tmp_path)
    inbox = tmp_path / "inbox"
    real_write = storage_module.atomic_write_bytes
    attempts = {"n": 0}

    def full_disk(*args, **kwargs):
        attempts["n"] += 1
        raise OSError(errno.ENOSPC, "No space left on device")

    try:
        (inbox / "before.png").write_bytes(png(100))
        assert wait_until(lambda: service.pipeline.processed == 1)
        assert wait_until(lambda: ready(service)[0] == 200)

        monkeypatch.setattr(storage_module, "atomic_write_bytes", full_disk)
        for index in range(FRAMES):
            (inbox / f"f{index}.png").write_bytes(png(10 + index))
        # Each frame fails well past max_attempts (3) while the disk is full.
        assert wait_until(lambda: service.pipeline.failed >= 4 * FRAMES, 120), service.pipeline.failed
        code, body = ready(service)
        assert code == 503, body
        assert any("waiting out a resource fault" in cause and "disk full" in cause
                   for cause in body["details"]["causes"]), body["details"]["causes"]
        assert service.pipeline.dead_letters.count == 0
        assert counts(service) == (1, 0)  # nothing inspected, nothing given up
        metrics = httpx.get(f"http://127.0.0.1:{service.http_port}/metrics", timeout=10).text
        assert 'anomalyd_resource_faults_total{resource="disk full"}' in metrics

        monkeypatch.setattr(storage_module, "atomic_write_bytes", real_write)  # space returns
        assert wait_until(lambda: counts(service)[0] == 1 + FRAMES, 120), counts(service)
        assert counts(service) == (1 + FRAMES, 0)
        assert service.pipeline.dead_letters.count == 0
        assert wait_until(lambda: ready(service)[0] == 200, 30), ready(service)
        assert sorted(p.name for p in (inbox / "processed").iterdir()) == \
            sorted(["before.png", *(f"f{index}.png" for index in range(FRAMES))])
    finally:
        monkeypatch.setattr(storage_module, "atomic_write_bytes", real_write)
        service.stop()
    messages = [record.getMessage() for record in caplog.records]
    assert sum("resource fault, waiting it out: disk full" in m for m in messages) == 1, messages
    assert any("recovered from the resource fault" in m for m in messages), messages
    assert not any("given up (dead letter" in m for m in messages)


def test_readiness_recovers_without_new_frames_once_the_hold_passes():
    from daemon.telemetry.health import ResourceFaults

    clock = [0.0]
    faults = ResourceFaults(hold_s=30, clock=lambda: clock[0])
    faults.fault("database unavailable", "persist", OSError("connection refused"))
    assert "database unavailable" in faults.problem()
    clock[0] += 29
    assert faults.problem() is not None
    clock[0] += 2  # no frame has failed on it for hold_s: the direct checks speak for the database again
    assert faults.problem() is None
    faults.fault("disk full", "persist", OSError(errno.ENOSPC, "No space left on device"))
    assert faults.problem() is not None and faults.episodes == 2
    faults.recovered()  # a frame got through
    assert faults.problem() is None
