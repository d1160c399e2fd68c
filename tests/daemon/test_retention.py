"""Retention on SQLite and PostgreSQL: old unlabelled rows and their files go, labelled ones stay, no orphans."""

from __future__ import annotations

import os
import time
import uuid
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from sqlalchemy import select

from adapters.db import (
    Inspection,
    Label,
    OutboxMessage,
    RejectedFrame,
    make_engine,
    make_session_factory,
    upgrade,
)
from adapters.db.history import store_label_mask
from adapters.storage import ArtifactStore
from daemon.process.retention import RetentionJob
from tests.adapters.test_db import create_pg_database

NOW = datetime(2024, 6, 30, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def db(request, tmp_path):
    url = f"sqlite:///{tmp_path}/r.db" if request.param == "sqlite" else create_pg_database(
        request.getfixturevalue("postgres").url)
    engine = make_engine(url)
    upgrade(engine)
    yield make_session_factory(engine), ArtifactStore(tmp_path / "artifacts")
    engine.dispose()


def add(sessions, store, days_ago: float, *, anomalous=False, label=None, label_mask=False) -> Inspection:
    when = NOW - timedelta(days=days_ago)
    key = uuid.uuid4().hex
    img = np.zeros((8, 8), np.uint8)
    paths = store.write(key, when, rgb=np.zeros((8, 8, 3), np.uint8), anomaly_map=img.astype(np.float32), mask=img)
    row = Inspection(uuid=key, frame_id=key, source="cam", line="l", captured_at=when, model_version="v",
                     score=0.9 if anomalous else 0.1, threshold=0.5, is_anomalous=anomalous, regions=[],
                     mask_path=paths.mask, heatmap_path=paths.heatmap, frame_path=paths.frame)
    with sessions() as session, session.begin():
        session.add(row)
        session.flush()
        if anomalous:
            session.add(OutboxMessage(event_type="inspection", body={}, inspection_id=row.id))
        if label:
            mask_path = store_label_mask(store, b"\x89PNG fake", when) if label_mask else None
            session.add(Label(inspection_id=row.id, label=label, author="op", mask_path=mask_path))
    return row


def files_of(store, row) -> list:
    return [store.path(p) for p in (row.mask_path, row.heatmap_path, row.frame_path)]


def test_old_rows_and_files_deleted_labelled_kept(db):
    sessions, store = db
    old_plain = add(sessions, store, 40)
    old_alert = add(sessions, store, 35, anomalous=True)
    old_labelled = add(sessions, store, 50, anomalous=True, label="anomalous", label_mask=True)
    old_labelled_normal = add(sessions, store, 45, label="normal")
    recent = add(sessions, store, 5, anomalous=True)
    with sessions() as session, session.begin():
        session.add(RejectedFrame(source="cam", frame_id="x", reason="bad", created_at=NOW - timedelta(days=31)))
        session.add(RejectedFrame(source="cam", frame_id="y", reason="bad", created_at=NOW - timedelta(days=1)))

    result = RetentionJob(sessions, store, retention_days=30, batch_size=1).run_once(now=NOW)

    assert result.inspections_deleted == 2 and result.files_deleted == 6 and result.kept_labelled == 2
    assert result.rejected_deleted == 1
    with sessions() as session:
        left = set(session.scalars(select(Inspection.id)))
        outbox = session.scalars(select(OutboxMessage.inspection_id)).all()
        rejected = session.scalars(select(RejectedFrame.frame_id)).all()
        label_masks = [p for p in session.scalars(select(Label.mask_path)) if p]
    assert left == {old_labelled.id, old_labelled_normal.id, recent.id}
    assert sorted(outbox, key=lambda v: (v is not None, v)) == [None, old_labelled.id, recent.id]  # SET NULL
    assert rejected == ["y"]
    for row in (old_plain, old_alert):
        assert not any(path.exists() for path in files_of(store, row))
    for row in (old_labelled, old_labelled_normal, recent):
        assert all(path.exists() for path in files_of(store, row))
    assert store.path(label_masks[0]).exists()
    # no orphan: every artifact file left is referenced by a row
    referenced = {store.path(p) for row in (old_labelled, old_labelled_normal, recent)
                  for p in (row.mask_path, row.heatmap_path, row.frame_path)} | {store.path(label_masks[0])}
    assert {p.resolve() for p in store.root.rglob("*") if p.is_file()} == referenced
    # emptied day folders are removed too
    assert not (store.root / (NOW - timedelta(days=40)).strftime("%Y/%m/%d")).exists()
    # a second run finds nothing more
    again = RetentionJob(sessions, store, retention_days=30).run_once(now=NOW)
    assert again.inspections_deleted == 0 and again.files_deleted == 0


def test_keep_anomalous_option_and_disabled(db):
    sessions, store = db
    alert = add(sessions, store, 40, anomalous=True)
    plain = add(sessions, store, 40)
    assert RetentionJob(sessions, store, retention_days=None).run_once(now=NOW).inspections_deleted == 0
    RetentionJob(sessions, store, retention_days=30, keep_anomalous=True).run_once(now=NOW)
    with sessions() as session:
        assert set(session.scalars(select(Inspection.id))) == {alert.id}
    assert not any(path.exists() for path in files_of(store, plain))


def test_orphan_sweep_respects_grace_and_foreign_files(db):
    sessions, store = db
    kept = add(sessions, store, 1)
    day = store.root / "2024" / "06" / "01"
    day.mkdir(parents=True)
    orphan = day / f"{uuid.uuid4().hex}_heatmap.jpg"  # e.g. a crash between the row commit and the unlink
    orphan.write_bytes(b"x")
    young = day / f"{uuid.uuid4().hex}_mask.png"  # written just now, its row not committed yet
    young.write_bytes(b"x")
    foreign = day / "notes.txt"  # not a name the server writes: never touched
    foreign.write_text("keep")
    old = time.time() - 7200
    os.utime(orphan, (old, old))
    os.utime(foreign, (old, old))
    for path in files_of(store, kept):
        os.utime(path, (old, old))

    removed = RetentionJob(sessions, store, retention_days=30, orphan_grace_s=3600).sweep_orphans()

    assert removed == 1 and not orphan.exists()
    assert young.exists() and foreign.exists()
    assert all(path.exists() for path in files_of(store, kept))


def test_background_thread_runs_and_stops(db):
    sessions, store = db
    add(sessions, store, 400)
    job = RetentionJob(sessions, store, retention_days=30)
    job.start(interval_s=3600, initial_delay_s=0.01)
    deadline = time.monotonic() + 30
    while job.last_result is None and time.monotonic() < deadline:
        time.sleep(0.02)
    job.stop()
    assert job.last_result is not None and job.last_result.inspections_deleted == 1


def test_the_daemon_runs_retention_when_configured(tmp_path):
    from daemon.config.settings import load_config
    from daemon.process.service import Service
    from tests.daemon.test_pipeline import ConstantDetector

    config = tmp_path / "config.toml"
    for days, expected in ((7, True), (0, False)):
        keep = f"retention_days = {days}"
        config.write_text(f"[mqtt]\nenabled = false\n[api]\nenabled = false\n[storage]\ndir = \"art\"\n{keep}\n")
        service = Service(load_config(config, environ={}), detector=ConstantDetector(), sources=[])
        service.start()
        try:
            assert (service.jobs.retention is not None) is expected
            if expected:
                assert service.jobs.retention.retention_days == 7
        finally:
            service.stop()
        if expected:
            assert service.jobs.retention._stop.is_set()
