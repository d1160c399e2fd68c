"""Neutral outbox events (issue 22): the writers store what happened once; MQTT and webhooks each format their own
message (the documented payloads, byte for byte) and keep their own cursor, so every event leaves in `seq` order,
exactly once per sink, also across a restart; rows written before migration 0007 stay deliverable as they were."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa
from alembic import command

from adapters.db import OutboxMessage, add_event, make_engine, make_session_factory, sink_cursor, upgrade
from adapters.db.migrate import alembic_config
from adapters.db.outbox import as_event, count_pending_outbox
from adapters.events import DRIFT, INSPECTION, RESULT, THRESHOLD, inspection_body, threshold_body
from adapters.mqtt import MqttPublisher, MqttSettings, alert_payload, mqtt_message
from adapters.webhooks import SIGNATURE_HEADER, WebhookRelay, WebhookTarget, verify, webhook_request
from tests.adapters.test_mqtt import Subscriber
from tests.waiting import wait_until
from tests.webhook_receiver import Receiver

CAPTURED = datetime(2026, 12, 7, 12, 0, 1, 250000, tzinfo=timezone.utc)
REGIONS = [{"x": 1, "y": 2, "w": 3, "h": 4, "area": 12, "peak": 0.95}]


def alert_event(inspection_id: int, source: str = "cam1", line: str = "line1") -> tuple[str, dict]:
    return INSPECTION, inspection_body(
        inspection_id=inspection_id, frame_id=f"frame-{inspection_id}", captured_at=CAPTURED, source=source,
        line=line, score=0.91234567, threshold=0.5, model_version="v1", regions=REGIONS,
        mask_path="2026/12/07/m.png", heatmap_path="2026/12/07/h.jpg", frame_path="2026/12/07/f.png")


def mixed_events(count: int, source: str, line: str) -> list[tuple[str, dict]]:
    """Every neutral event type in turn: alerts, threshold changes, drifts, trigger answers."""
    events = []
    for n in range(count):
        kind = n % 4
        if kind == 0:
            events.append(alert_event(n + 1, source, line))
        elif kind == 1:
            events.append((THRESHOLD, threshold_body({"id": n, "source": source, "model_version": "v1",
                                                      "action": "applied", "threshold": 0.5}, line)))
        elif kind == 2:
            events.append((DRIFT, {"event": "drift", "state": "drifting", "drift_id": f"d{n}", "source": source,
                                   "line": line, "frames": 3}))
        else:
            events.append((RESULT, {"trigger_id": f"t{n}", "part_id": None, "source": source, "line": line,
                                    "result": "NG"}))
    return events


def add_in_one_transaction(sessions, events: list[tuple[str, dict]]) -> list[str]:
    with sessions() as session, session.begin():
        return [add_event(session, event_type, body).id for event_type, body in events]


def test_contract_payloads_are_byte_for_byte_the_documented_ones():
    """The formatters give what the writers published before the outbox was neutral (interfaces.md)."""
    event_type, body = alert_event(7)
    event = as_event(OutboxMessage(id="a-1", seq=1, event_type=event_type, body=body))
    expected = json.dumps(alert_payload(inspection_id=7, frame_id="frame-7", captured_at=CAPTURED, source="cam1",
                                        line="line1", score=0.91234567, threshold=0.5, model_version="v1",
                                        regions=REGIONS, alert_id="a-1"), separators=(",", ":"))
    assert expected == (
        '{"id":"a-1","inspection_id":7,"frame_id":"frame-7","ts":"2026-12-07T12:00:01.250Z","source":"cam1",'
        '"line":"line1","score":0.912346,"threshold":0.5,"model_version":"v1",'
        '"regions":[{"x":1,"y":2,"w":3,"h":4,"area":12,"peak":0.95}],'
        '"mask_url":"/api/inspections/7/mask.png","heatmap_url":"/api/inspections/7/heatmap.jpg"}')
    message = mqtt_message(event, "plant", 1)
    assert (message.topic, message.payload, message.qos, message.retain) == ("plant/line1/cam1/anomaly", expected,
                                                                            1, False)
    request = webhook_request(event, "s3cret")
    assert request.body == expected.encode() and request.event == "anomaly"
    assert request.headers["X-Anomalyd-Id"] == "a-1" and verify("s3cret", request.body,
                                                                request.headers[SIGNATURE_HEADER])
    change = {"id": 12, "source": "cam1", "action": "applied", "threshold": 0.4}
    threshold = as_event(OutboxMessage(id="t-1", seq=2, event_type=THRESHOLD, body=threshold_body(change, "line1")))
    message = mqtt_message(threshold, "plant", 0)
    assert message.payload == ('{"id":"t-1","source":"cam1","action":"applied","threshold":0.4,"change_id":12,'
                               '"event":"threshold","line":"line1"}')
    assert (message.topic, message.qos, message.retain) == ("plant/line1/cam1/threshold", 1, True)
    drift = as_event(OutboxMessage(id="d-1", seq=3, event_type=DRIFT, body={"event": "drift", "state": "cleared",
                                                                           "source": "cam1", "line": "line1"}))
    assert mqtt_message(drift, "plant", 0).payload == ('{"id":"d-1","event":"drift","state":"cleared",'
                                                       '"source":"cam1","line":"line1"}')
    assert webhook_request(drift, None).event == "drift" and SIGNATURE_HEADER not in webhook_request(drift, None).headers


@pytest.mark.services
def test_events_of_one_transaction_and_across_a_restart_leave_in_seq_order_once_on_mqtt_and_a_webhook(
        mosquitto, sqlite_sessions):
    prefix = f"t{uuid.uuid4().hex[:8]}"
    subscriber = Subscriber(mosquitto.port, f"{prefix}/#")
    receiver = Receiver()
    hook = WebhookTarget(name="plant", url=receiver.url, secret="s3cret", allow_private=True, anomalous_only=False,
                         timeout_s=5, backoff_min_s=0.05, backoff_max_s=0.2)

    def start() -> tuple[MqttPublisher, WebhookRelay]:
        publisher = MqttPublisher(MqttSettings(host="127.0.0.1", port=mosquitto.port, prefix=prefix,
                                               client_id=f"anomalyd-{uuid.uuid4().hex[:6]}"), sqlite_sessions)
        relay = WebhookRelay([hook], sqlite_sessions, poll_interval_s=0.05)
        publisher.start()
        relay.start()
        return publisher, relay

    publisher, relay = start()
    try:
        first = add_in_one_transaction(sqlite_sessions, mixed_events(120, "cam1", "line1"))
        publisher.notify()
        relay.notify()
        assert publisher.flush(60) and relay.flush(60)
        publisher.stop()
        relay.stop()
        # down: more events, one transaction, then a restart that reads the cursors back
        second = add_in_one_transaction(sqlite_sessions, mixed_events(80, "cam2", "line2"))
        with sqlite_sessions() as session:
            assert count_pending_outbox(session) == 80 and count_pending_outbox(session, "webhook:plant") == 80
        publisher, relay = start()
        publisher.notify()
        relay.notify()
        assert publisher.flush(60) and relay.flush(60)
        expected = first + second
        def events_published() -> list[tuple[str, dict]]:  # not `<prefix>/available`
            with subscriber.lock:
                return [(topic, json.loads(payload)) for topic, payload, _ in subscriber.messages
                        if topic.rsplit("/", 1)[-1] in ("anomaly", "threshold", "drift", "result")]

        assert wait_until(lambda: len(events_published()) >= len(expected), 60)
        time.sleep(0.3)  # nothing more may come
        published = events_published()
        assert [payload["id"] for _, payload in published] == expected  # seq order, each once
        kinds = [topic.rsplit("/", 1)[-1] for topic, _ in published]
        assert kinds[:4] == ["anomaly", "threshold", "drift", "result"]
        assert receiver.ids() == expected
        for headers, body in receiver.bodies():
            assert verify("s3cret", body, headers[SIGNATURE_HEADER.lower()])
        with sqlite_sessions() as session:
            last = session.scalar(sa.select(sa.func.max(OutboxMessage.seq)))
            assert sink_cursor(session, "mqtt") == sink_cursor(session, "webhook:plant") == last
    finally:
        publisher.stop()
        relay.stop()
        receiver.stop()
        subscriber.close()


@pytest.mark.services
def test_seq_order_is_commit_order_on_postgresql(postgres):
    """A writer that numbers a row waits until the one that numbered before it committed: a sink's cursor can never
    pass a row that becomes visible later."""
    engine = make_engine(postgres.create_database(f"order_{uuid.uuid4().hex[:8]}"))
    upgrade(engine)
    sessions = make_session_factory(engine)
    done = threading.Event()
    try:
        with sessions() as session, session.begin():
            first = add_event(session, *alert_event(1))
            session.flush()

            def second_writer() -> None:
                add_in_one_transaction(sessions, [alert_event(2)])
                done.set()

            thread = threading.Thread(target=second_writer)
            thread.start()
            assert not done.wait(1.0), "a second writer numbered a row while the first had not committed"
        thread.join(30)
        assert done.is_set()
        with sessions() as session:
            rows = session.scalars(sa.select(OutboxMessage).order_by(OutboxMessage.seq)).all()
            assert rows[0].id == first.id and len(rows) == 2
    finally:
        engine.dispose()


def test_migration_keeps_old_rows_deliverable_and_the_cursors_where_they_were(tmp_path):
    """A database at 0006: rows sent and not sent by MQTT, a webhook part way through. After 0007 each sink goes on
    from where it was, with the very messages it would have sent."""
    engine = make_engine(f"sqlite:///{tmp_path}/old.db")
    command.upgrade(alembic_config(engine), "0006_drift_no_decision")
    outbox = sa.table("outbox", *(sa.column(name) for name in (
        "id", "seq", "topic", "payload", "qos", "created_at", "sent_at", "attempts", "retain")))
    payloads = {name: json.dumps({"id": name, "source": "cam1", "line": "l1", "is_anomalous": True})
                for name in "abcd"}
    rows = [("a", 1, "anomalyd/l1/cam1/anomaly", "2026-12-01 10:00:00", "2026-12-01 10:00:01", False),
            ("b", 2, "anomalyd/l1/cam1/drift", "2026-12-01 10:00:01", None, True),
            ("c", 3, "anomalyd/l1/cam1/anomaly", "2026-12-01 10:00:02", "2026-12-01 10:00:03", False),
            ("d", 4, "anomalyd/l1/cam1/result", "2026-12-01 10:00:03", None, False)]
    with engine.begin() as connection:
        connection.execute(outbox.insert(), [
            {"id": i, "seq": seq, "topic": topic, "payload": payloads[i], "qos": 1, "created_at": created,
             "sent_at": sent, "attempts": 1, "retain": retain} for i, seq, topic, created, sent, retain in rows])
        connection.execute(sa.text("INSERT INTO webhook_endpoints (name, url, registered_at, settled_until, delivered, "
                                   "failures) VALUES ('plant', 'http://x', '2026-12-01 09:00:00', "
                                   "'2026-12-01 10:00:01', 1, 0)"))
        connection.execute(sa.text("INSERT INTO webhook_deliveries (webhook, outbox_id, status, created_at, "
                                   "settled_at, attempts) VALUES ('plant', 'b', 'delivered', '2026-12-01 10:00:01', "
                                   "'2026-12-01 10:00:02', 1)"))
    upgrade(engine)
    sessions = make_session_factory(engine)
    with sessions() as session:
        events = [as_event(row) for row in session.scalars(sa.select(OutboxMessage).order_by(OutboxMessage.seq))]
        assert [event.event_type for event in events] == ["mqtt"] * 4
        assert sink_cursor(session, "mqtt") == 1  # b was never acknowledged (c, after it, is published again)
        assert sink_cursor(session, "webhook:plant") == 2  # a before settled_until, b delivered: c is next
    for event, (_, _, topic, _, _, retain) in zip(events, rows, strict=True):
        message = mqtt_message(event, "other-prefix", 0)  # stored as published then, whatever the settings now
        assert (message.topic, message.payload, message.qos, message.retain) == (topic, payloads[event.id], 1, retain)
        request = webhook_request(event, None)
        assert request.body == payloads[event.id].encode() and request.event == topic.rsplit("/", 1)[-1]
    with sessions() as session, session.begin():  # new rows come after them
        new = add_event(session, *alert_event(9))
    with sessions() as session:
        assert session.get(OutboxMessage, new.id).seq == 5
    command.downgrade(alembic_config(engine), "0006_drift_no_decision")
    with engine.connect() as connection:
        back = connection.execute(sa.select(outbox.c.id, outbox.c.topic, outbox.c.payload, outbox.c.sent_at)
                                  .order_by(outbox.c.seq)).all()
    assert [(row.id, row.topic) for row in back[:4]] == [(i, topic) for i, _, topic, *_ in rows]
    assert back[4].topic == "anomalyd/line1/cam1/anomaly" and json.loads(back[4].payload)["id"] == new.id
    assert [row.sent_at is not None for row in back] == [True, False, False, False, False]
    engine.dispose()
