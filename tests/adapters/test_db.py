"""Database on SQLite and PostgreSQL: migrations, idempotent results, alert in the same transaction, outbox."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import pytest
from sqlalchemy import create_engine, func, inspect, select, text

from adapters.db import (
    Inspection,
    InspectionFilter,
    OutboxMessage,
    RejectedFrame,
    add_label,
    count_pending_outbox,
    current_revision,
    head_revision,
    list_inspections,
    make_engine,
    make_session_factory,
    pending_outbox,
    record_rejected,
    save_inspection,
    save_inspections,
    set_sink_cursor,
    sink_cursor,
    upgrade,
)
from adapters.events import inspection_body


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def engine(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/sub/test.db"
    else:
        url = create_pg_database(request.getfixturevalue("postgres").url)
    engine = make_engine(url)
    upgrade(engine)
    yield engine
    engine.dispose()


def create_pg_database(server_url: str) -> str:
    """A fresh database on the test server (by SQL: Postgres.create_database needs a createdb binary)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return server_url.rsplit("/", 1)[0] + f"/{name}"


def make_inspection(frame_id: str, score: float = 0.9, anomalous: bool = True, source: str = "cam") -> Inspection:
    return Inspection(frame_id=frame_id, source=source, line="l1", captured_at=datetime.now(timezone.utc),
                      model_version="v1", score=score, threshold=0.5, is_anomalous=anomalous,
                      regions=[{"x": 1, "y": 2, "w": 3, "h": 4, "area": 12, "peak": score}], mask_path="m.png")


def alert_builder(row: Inspection):
    if not row.is_anomalous:
        return None
    return "inspection", inspection_body(inspection_id=row.id, frame_id=row.frame_id, captured_at=row.captured_at,
                                         source=row.source, line=row.line, score=row.score, threshold=row.threshold,
                                         model_version=row.model_version, regions=row.regions)


def test_migrations_create_tables_and_reach_head(engine):
    assert current_revision(engine) == head_revision()
    names = set(inspect(engine).get_table_names())
    assert {"inspections", "labels", "model_versions", "training_runs", "outbox", "rejected_frames"} <= names
    indexes = {ix["name"] for ix in inspect(engine).get_indexes("inspections")}
    assert {"ix_inspections_source_captured_at", "ix_inspections_score",
            "ix_inspections_is_anomalous_captured_at"} <= indexes
    upgrade(engine)  # idempotent
    if engine.dialect.name == "sqlite":
        with engine.connect() as connection:
            assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert connection.execute(text("PRAGMA busy_timeout")).scalar() > 0


def test_save_is_idempotent_on_frame_id(engine):
    sessions = make_session_factory(engine)
    first = save_inspection(sessions, make_inspection("f1"), alert_builder)
    again = save_inspection(sessions, make_inspection("f1", score=0.1), alert_builder)
    assert first.created and not again.created
    assert again.inspection.id == first.inspection.id and again.inspection.score == pytest.approx(0.9)
    assert again.alert is not None and again.alert.id == first.alert.id
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Inspection)) == 1
        assert session.scalar(select(func.count()).select_from(OutboxMessage)) == 1
        stored = session.get(Inspection, first.inspection.id)
        assert stored.regions[0]["area"] == 12 and stored.captured_at.tzinfo is not None


def test_alert_is_in_the_same_transaction(engine):
    sessions = make_session_factory(engine)

    def broken_builder(row):
        raise RuntimeError("payload failed")

    with pytest.raises(RuntimeError):
        save_inspection(sessions, make_inspection("f2"), broken_builder)
    with sessions() as session:  # the inspection was rolled back with the alert
        assert session.scalar(select(func.count()).select_from(Inspection)) == 0
    saved = save_inspection(sessions, make_inspection("f3", score=0.2, anomalous=False), alert_builder)
    assert saved.created and saved.alert is None


def test_batch_save_matches_single_saves(engine):
    """One transaction for a writer's batch: new rows with their alerts, known frame_ids left as they were."""
    sessions = make_session_factory(engine)
    earlier = save_inspection(sessions, make_inspection("b0"), alert_builder)
    batch = [make_inspection("b0", score=0.1), make_inspection("b1"), make_inspection("b2", 0.2, anomalous=False),
             make_inspection("b1", score=0.3)]  # b1 twice: the second is a duplicate of the first
    saved = save_inspections(sessions, [(row, alert_builder) for row in batch])
    assert [s.created for s in saved] == [False, True, True, False]
    assert saved[0].inspection.id == earlier.inspection.id and saved[0].alert.id == earlier.alert.id
    assert saved[3].inspection.id == saved[1].inspection.id and saved[3].alert.id == saved[1].alert.id
    assert saved[1].alert.event_type == "inspection" and saved[1].alert.body["inspection_id"] == saved[1].inspection.id
    assert saved[2].alert is None
    with sessions() as session:
        scores = dict(session.execute(select(Inspection.frame_id, Inspection.score)).all())
        assert scores == {"b0": pytest.approx(0.9), "b1": pytest.approx(0.9), "b2": pytest.approx(0.2)}
        assert session.scalar(select(func.count()).select_from(OutboxMessage)) == 2

    def broken_builder(row):
        raise RuntimeError("payload failed")

    with pytest.raises(RuntimeError):  # all or nothing
        save_inspections(sessions, [(make_inspection("b3"), alert_builder), (make_inspection("b4"), broken_builder)])
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Inspection)) == 3


def test_outbox_pending_per_sink_cursor(engine):
    sessions = make_session_factory(engine)
    ids = [save_inspection(sessions, make_inspection(f"o{i}"), alert_builder).alert.id for i in range(3)]
    with sessions() as session, session.begin():
        pending = pending_outbox(session, limit=10)
        assert [row.id for row in pending] == ids  # oldest first
        seqs = [row.seq for row in pending]
        assert seqs == sorted(seqs) and sink_cursor(session, "mqtt") == 0  # the migration starts it
        set_sink_cursor(session, "mqtt", seqs[1])
    with sessions() as session, session.begin():
        assert [row.id for row in pending_outbox(session)] == ids[2:]
        assert count_pending_outbox(session) == 1 and count_pending_outbox(session, sink="webhook:x") == 3
        set_sink_cursor(session, "mqtt", seqs[0])  # never moves back
    with sessions() as session:
        assert sink_cursor(session, "mqtt") == seqs[1]


def test_rejected_frames_and_queries(engine):
    sessions = make_session_factory(engine)
    row, created = record_rejected(sessions, source="cam", frame_id="bad1", name="x.png", reason="empty file")
    again, created_again = record_rejected(sessions, source="cam", frame_id="bad1", name="x.png", reason="empty")
    assert created and not created_again and again.id == row.id
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(RejectedFrame)) == 1
    for i, score in enumerate([0.1, 0.7, 0.95]):
        save_inspection(sessions, make_inspection(f"q{i}", score=score, anomalous=score >= 0.5,
                                                  source="a" if i else "b"))
    with sessions() as session, session.begin():
        newest = list_inspections(session, limit=2)
        assert [r.frame_id for r in newest] == ["q2", "q1"]
        assert [r.frame_id for r in list_inspections(session, limit=2, before_id=newest[-1].id)] == ["q0"]
        assert [r.frame_id for r in list_inspections(session, InspectionFilter(source="a", min_score=0.8))] == ["q2"]
        assert [r.frame_id for r in list_inspections(session, InspectionFilter(anomalous=False))] == ["q0"]
        add_label(session, newest[0].id, "normal", author="op")
    with sessions() as session:
        assert [r.frame_id for r in list_inspections(session, InspectionFilter(label="normal"))] == ["q2"]
        assert {r.frame_id for r in list_inspections(session, InspectionFilter(label="none"))} == {"q0", "q1"}


def test_recorded_frame_ids_of_a_video_newest_first(engine):
    from adapters.db.repository import recorded_frame_ids

    sessions = make_session_factory(engine)
    for frame_id, source in (("vid:a_b.avi:0", "vid"), ("vid:a_b.avi:1", "vid"), ("vid:aXb.avi:9", "vid"),
                             ("vid:a_b.avi:2", "other"), ("vid:a_b.avi#1:0", "vid")):
        save_inspection(sessions, make_inspection(frame_id, source=source))
    record_rejected(sessions, source="vid", frame_id="vid:a_b.avi:5", name="a_b.avi[5]", reason="undecodable")
    with sessions() as session:
        # `_` in the prefix is a literal, not a LIKE wildcard; other sources do not count
        assert recorded_frame_ids(session, "vid", "vid:a_b.avi") == [
            "vid:a_b.avi#1:0", "vid:a_b.avi:1", "vid:a_b.avi:0", "vid:a_b.avi:5"]
        assert recorded_frame_ids(session, "vid", "vid:a_b.avi", limit=1) == ["vid:a_b.avi#1:0", "vid:a_b.avi:5"]
