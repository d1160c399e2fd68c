"""Disk-full hygiene (issue 9, cases 11-12): failed artifact writes leave no .tmp files, identical errors are
logged once per interval with a count, and orphan artifacts are swept at start even with retention off."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pytest

import adapters.storage as storage_module
import daemon.frames.pipeline as pipeline_module
import model.atomic as atomic_module
from adapters.storage import ArtifactStore
from tests.daemon.test_pipeline import ConstantDetector, png
from tests.hardening.helpers import RedeliveringSource, make_pipeline
from tests.waiting import wait_until


def full_disk_replace(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_case11_a_failed_artifact_write_leaves_no_tmp_file(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path / "artifacts")
    monkeypatch.setattr(atomic_module.os, "replace", full_disk_replace)  # the artifact store writes through model.atomic
    rgb = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(OSError, match="No space left"):
        store.write("k", storage_module.datetime.now(storage_module.timezone.utc), rgb=rgb,
                    anomaly_map=np.zeros((16, 16), np.float32), mask=np.zeros((16, 16), bool))
    monkeypatch.undo()
    assert [p for p in (tmp_path / "artifacts").rglob("*") if p.is_file()] == []


def test_case11_repeated_identical_errors_are_logged_once_per_interval_with_a_count(sqlite_sessions, tmp_path,
                                                                                   monkeypatch, caplog):
    monkeypatch.setattr(pipeline_module.REPEATS, "interval_s", 1.0)
    # The filter's own clock: the 30 failures fall in one interval however slowly a busy machine runs them.
    clock = [1000.0]
    monkeypatch.setattr(pipeline_module.REPEATS, "_clock", lambda: clock[0])
    monkeypatch.setattr(pipeline_module.REPEATS, "_runs", {})
    source = RedeliveringSource(limit=1)
    pipeline = make_pipeline(sqlite_sessions, tmp_path, [source], ConstantDetector(0.1), max_attempts=100)
    monkeypatch.setattr(atomic_module.os, "replace", full_disk_replace)  # the artifact store writes through model.atomic
    caplog.set_level(logging.WARNING, logger="daemon.frames.pipeline")
    pipeline.start()
    try:
        for index in range(30):
            source.push(f"f{index}", png(index))
        assert wait_until(lambda: pipeline.failed >= 30, 30), (pipeline.failed, pipeline.processed, pipeline.errors)
        clock[0] += 1.1
        source.push("last", png(1))
        assert wait_until(lambda: pipeline.failed >= 31, 30)
    finally:
        pipeline.stop(10)
        monkeypatch.undo()
    artifact_errors = [r for r in caplog.records if "cannot write the artifacts" in r.getMessage()]
    assert 2 <= len(artifact_errors) <= 4, [r.getMessage() for r in artifact_errors]  # not 31
    assert sum(1 for r in artifact_errors if r.exc_info) <= 2  # tracebacks only for the first of a run
    assert any("more like this in the last 1s" in r.getMessage() for r in artifact_errors)
    assert [p.name for p in (tmp_path / "artifacts").rglob("*.tmp")] == []


def test_case12_orphan_artifacts_are_swept_at_start_with_retention_off(tmp_path, monkeypatch):
    from daemon.config.settings import load_config
    from daemon.process import background
    from daemon.process.service import Service

    monkeypatch.setattr(background, "ORPHAN_SWEEP_DELAY_S", 0.05)
    config = tmp_path / "config.toml"
    config.write_text('[mqtt]\nenabled = false\n[api]\nenabled = false\n[storage]\ndir = "art"\n'
                      "retention_days = 0\n")
    day = tmp_path / "art" / "2024" / "05" / "01"
    day.mkdir(parents=True)
    orphan = day / "0123456789abcdef0123456789abcdef_mask.png"  # written, then SIGKILL before the commit
    orphan.write_bytes(b"\x89PNG orphan")
    fresh = day / "fedcba9876543210fedcba9876543210_mask.png"  # maybe a write in flight: within the grace
    fresh.write_bytes(b"\x89PNG fresh")
    old = time.time() - 2 * 3600
    os.utime(orphan, (old, old))
    service = Service(load_config(config, environ={}), detector=ConstantDetector(), sources=[])
    service.start()
    try:
        assert service.jobs.retention is None and service.jobs.orphan_sweeper is not None
        assert wait_until(lambda: not orphan.exists(), 30)
        assert service.jobs.orphan_sweeper.last_result.orphans_deleted == 1
    finally:
        service.stop()
    assert fresh.exists()
