"""The daemon's drift record (daemon/zero_label/drift.py) from the drift watch's per-frame notes, without a model: the drift's
start time is its first frame's, would-be alerts are counted while it lasts, it ends when the frames match again or
the source gets other references, and a drift left open by a stopped daemon is closed at the next start. Each
state is one retained outbox message (MQTT and webhooks deliver it; tests/daemon/test_e2e_drift.py end to end)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from sqlalchemy import select

from adapters.db.outbox import as_event
from adapters.db.tables import DriftEvent, OutboxMessage
from adapters.mqtt import MqttMessage, mqtt_message
from daemon.telemetry.metrics import Metrics
from daemon.zero_label.drift import DriftTracker, drift_status

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=timezone.utc)
VERSION = "mutual-efficientnet-lite0-t4-10-s256-w32-r1.35"


def feed(tracker: DriftTracker, notes: list[dict], first: int = 0, version: str = VERSION) -> list[bool]:
    return [tracker.observe("cam1", "line1", version, note, T0 + timedelta(seconds=first + i))
            for i, note in enumerate(notes)]


def messages(sessions, prefix: str = "anomalyd") -> list[tuple[MqttMessage, dict]]:
    """The outbox's events as MQTT publishes them (its formatter), with their payloads."""
    with sessions() as session:
        rows = session.scalars(select(OutboxMessage).order_by(OutboxMessage.seq)).all()
        assert {row.event_type for row in rows} <= {"drift"}
        rendered = [mqtt_message(as_event(row), prefix, 0) for row in rows]
    return [(message, json.loads(message.payload)) for message in rendered]


def quiet(index: int) -> dict:
    return {"decided": True, "drift_index": index, "drifting": False, "excursion_start": None}


def excursion(index: int, start: int, **more) -> dict:
    return {"decided": True, "drift_index": index, "drifting": False, "excursion_start": start, **more}


def test_a_drift_is_one_retained_message_from_its_first_frame_until_the_frames_match_again(sqlite_sessions):
    metrics = Metrics()
    tracker = DriftTracker(sqlite_sessions, metrics=metrics)
    assert feed(tracker, [quiet(0), quiet(1)]) == [False, False]
    signal = {"frame": 2, "detected_at": 4, "share": 0.9}
    in_drift = feed(tracker, [excursion(2, 2), excursion(3, 2),
                              excursion(4, 2, drifting=True, drift_event=signal),
                              excursion(5, 2, drifting=True), excursion(6, 2, drifting=True)], first=2)
    assert in_drift == [False, False, True, True, True]  # held back from the signal on, not before
    for _ in range(2):
        tracker.suppressed("cam1")
    assert tracker.publish() is True
    (row, payload), = messages(sqlite_sessions)
    assert row.topic == "anomalyd/line1/cam1/drift" and row.retain and row.qos == 1
    assert payload["state"] == "drifting" and payload["started_at"] == "2026-12-07T12:00:02.000Z"
    assert payload["detected_at"] == "2026-12-07T12:00:04.000Z" and payload["frames"] == 3
    assert payload["references_proposal"] == "/api/sources/cam1/references/proposal?since=2026-12-07T12:00:02.000Z"
    assert drift_status(sqlite_sessions, "cam1")["current"]["suppressed"] == 2
    assert 'anomalyd_source_drift{source="cam1"} 1.0' in metrics.render().decode()
    # the frames match the window again: the drift ends, said once more (retained: it replaces the first)
    assert feed(tracker, [{**quiet(7), "drift_cleared": True}, quiet(8)], first=7) == [False, False]
    assert tracker.publish() is True
    ended = messages(sqlite_sessions)[1][1]
    assert ended["state"] == "cleared" and ended["drift_id"] == payload["drift_id"] and ended["suppressed"] == 2
    assert ended["reason"] == "the frames match the window again"
    status = drift_status(sqlite_sessions, "cam1")
    assert status["drifting"] is False and status["items"][0]["cleared_at"] is not None
    assert 'anomalyd_source_drift{source="cam1"} 0.0' in metrics.render().decode()
    assert tracker.publish() is False  # nothing new: no message


def test_new_references_end_a_drift_and_a_restart_closes_one_left_open(sqlite_sessions):
    tracker = DriftTracker(sqlite_sessions)
    signal = {"frame": 0, "detected_at": 1, "share": 0.8}
    feed(tracker, [excursion(0, 0), excursion(1, 0, drifting=True, drift_event=signal)])
    tracker.publish()
    # the operator approved references: the source's frames come from PatchCore now
    assert feed(tracker, [None], first=2, version="patchcore-abc-k4") == [False]
    tracker.publish()
    ended = messages(sqlite_sessions)[-1][1]
    assert ended["state"] == "cleared" and "patchcore-abc-k4" in ended["reason"]
    # a drift open when the daemon stopped is closed by the next start (its window starts again)
    feed(tracker, [excursion(3, 3), excursion(4, 3, drifting=True, drift_event={**signal, "frame": 3,
                                                                                 "detected_at": 4})], first=3)
    tracker.publish()
    assert drift_status(sqlite_sessions, "cam1")["drifting"] is True
    restarted = DriftTracker(sqlite_sessions)
    assert restarted.recover() is True
    last_row, last = messages(sqlite_sessions)[-1]
    assert last_row.retain and last["state"] == "cleared" and "restarted" in last["reason"]
    assert drift_status(sqlite_sessions, "cam1")["drifting"] is False
    assert restarted.recover() is False
    with sqlite_sessions() as session:
        assert len(session.scalars(select(DriftEvent)).all()) == 2
