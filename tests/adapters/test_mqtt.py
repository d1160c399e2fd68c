"""MQTT with a real Mosquitto: contract payloads, broker outage and restart, daemon restart with pending alerts."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import datetime, timezone

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import select

from adapters.db import (
    Inspection,
    OutboxMessage,
    make_engine,
    make_session_factory,
    save_inspection,
    sink_cursor,
    upgrade,
)
from adapters.events import INSPECTION, inspection_body
from adapters.mqtt import MqttPublisher, MqttSettings
from tests.services import Mosquitto, free_port

pytestmark = pytest.mark.services


class Subscriber:
    """A real MQTT consumer; `persistent` keeps its session (and queued QoS1 messages) across broker restarts."""

    def __init__(self, port: int, pattern: str = "anomalyd/#", persistent: bool = False) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        client_id = f"sub-{uuid.uuid4().hex[:8]}" if persistent else ""
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not persistent)
        self.client.on_connect = lambda c, *_: c.subscribe(pattern, qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(30), "subscriber could not subscribe"

    def _on_message(self, _client, _userdata, message) -> None:
        with self.lock:
            self.messages.append((message.topic, message.payload, message.retain))

    def payloads(self, suffix: str) -> list[dict]:
        with self.lock:
            return [json.loads(p) for t, p, _ in self.messages if t.endswith(suffix)]

    def texts(self, topic_name: str) -> list[str]:
        with self.lock:
            return [p.decode() for t, p, _ in self.messages if t == topic_name]

    def wait_for(self, predicate, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.05)
        return predicate()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def sessions(sqlite_sessions):
    return sqlite_sessions


def settings_for(port: int) -> MqttSettings:
    return MqttSettings(host="127.0.0.1", port=port, client_id=f"anomalyd-test-{uuid.uuid4().hex[:6]}",
                        reconnect_min_s=1, reconnect_max_s=1)


def add_alert(sessions, n: int) -> str:
    """An anomalous inspection with its outbox alert, as the pipeline writes it; returns the alert id."""
    captured = datetime.now(timezone.utc)
    row = Inspection(frame_id=f"frame-{n}-{uuid.uuid4().hex[:6]}", source="cam", line="l1", captured_at=captured,
                     model_version="v1", score=0.9, threshold=0.5, is_anomalous=True, regions=[])

    def build(r):
        return INSPECTION, inspection_body(
            inspection_id=r.id, frame_id=r.frame_id, captured_at=captured, source="cam", line="l1", score=0.9,
            threshold=0.5, model_version="v1", regions=[{"x": 1, "y": 2, "w": 3, "h": 4, "area": 12, "peak": 0.95}])

    return save_inspection(sessions, row, build).alert.id


def sent_count(sessions) -> int:
    """Rows MQTT's cursor is past: acknowledged by the broker."""
    with sessions() as session:
        cursor = sink_cursor(session, "mqtt") or 0
        return len(session.scalars(select(OutboxMessage).where(OutboxMessage.seq <= cursor)).all())


def test_alert_is_published_with_contract_payload_and_marked_sent(mosquitto, sessions):
    subscriber = Subscriber(mosquitto.port)
    publisher = MqttPublisher(settings_for(mosquitto.port), sessions)
    publisher.start()
    try:
        alert_id = add_alert(sessions, 1)
        publisher.notify()
        assert subscriber.wait_for(lambda: subscriber.payloads("/anomaly"))
        payload = subscriber.payloads("/anomaly")[0]
        with sessions() as session:
            inspection = session.scalars(select(Inspection)).one()
        assert payload["id"] == alert_id and payload["inspection_id"] == inspection.id
        assert payload["frame_id"] == inspection.frame_id and payload["source"] == "cam" and payload["line"] == "l1"
        assert payload["score"] == 0.9 and payload["threshold"] == 0.5 and payload["model_version"] == "v1"
        assert payload["regions"] == [{"x": 1, "y": 2, "w": 3, "h": 4, "area": 12, "peak": 0.95}]
        assert payload["mask_url"] == f"/api/inspections/{inspection.id}/mask.png"
        assert payload["ts"].endswith("Z")
        assert subscriber.wait_for(lambda: "online" in subscriber.texts("anomalyd/available"))
        publisher.publish_status("l1", "cam", "online")
        assert subscriber.wait_for(lambda: subscriber.texts("anomalyd/l1/cam/status") == ["online"])
        assert publisher.flush(10) and sent_count(sessions) == 1
    finally:
        publisher.stop()
        assert subscriber.wait_for(lambda: subscriber.texts("anomalyd/available")[-1:] == ["stopped"], 30)
        subscriber.close()


def test_broker_outage_loses_no_alert(sessions):
    with Mosquitto() as broker:
        subscriber = Subscriber(broker.port, persistent=True)
        publisher = MqttPublisher(settings_for(broker.port), sessions)
        publisher.start()
        try:
            ids = [add_alert(sessions, i) for i in range(5)]
            publisher.notify()
            assert subscriber.wait_for(lambda: len(subscriber.payloads("/anomaly")) >= 5)
            broker.stop()
            assert (broker.dir / "mosquitto.db").exists(), "the broker did not persist the subscriber's session"
            assert subscriber.wait_for(lambda: not publisher.state.connected, 30)
            ids += [add_alert(sessions, i) for i in range(5, 25)]  # written during the outage
            publisher.notify()
            time.sleep(0.5)
            assert publisher.pending() == 20  # waiting in the outbox, not lost
            broker.start()  # same port, same persistent sessions
            assert subscriber.wait_for(lambda: {p["id"] for p in subscriber.payloads("/anomaly")} == set(ids), 60)
            assert publisher.flush(30) and publisher.pending() == 0
        finally:
            publisher.stop()
            subscriber.close()


def test_pending_outbox_is_published_after_restart(mosquitto, sessions):
    absent = MqttPublisher(settings_for(free_port()), sessions)  # no broker there
    absent.start()
    ids = [add_alert(sessions, i) for i in range(3)]
    absent.notify()
    time.sleep(0.3)
    assert not absent.flush(0.5)
    absent.stop()
    assert sent_count(sessions) == 0 and absent.state.last_error
    subscriber = Subscriber(mosquitto.port)
    restarted = MqttPublisher(settings_for(mosquitto.port), sessions)
    restarted.start()
    try:
        assert subscriber.wait_for(lambda: {p["id"] for p in subscriber.payloads("/anomaly")} == set(ids))
        assert restarted.flush(10) and sent_count(sessions) == 3
    finally:
        restarted.stop()
        subscriber.close()


def test_relay_survives_a_database_outage(mosquitto, private_postgres):
    """PostgreSQL stops while the relay polls the outbox: the relay keeps retrying and publishes afterwards."""
    engine = make_engine(private_postgres.create_database("relay"))
    upgrade(engine)
    sessions = make_session_factory(engine)
    subscriber = Subscriber(mosquitto.port)
    publisher = MqttPublisher(settings_for(mosquitto.port), sessions, poll_interval_s=0.1)
    publisher.start()
    try:
        first = add_alert(sessions, 0)
        publisher.notify()
        assert subscriber.wait_for(lambda: {p["id"] for p in subscriber.payloads("/anomaly")} == {first})
        private_postgres.stop()
        time.sleep(1.5)  # several failed polls
        assert publisher.crashed is None and publisher._thread.is_alive()
        private_postgres.start()
        later = add_alert(sessions, 1)
        publisher.notify()
        assert subscriber.wait_for(lambda: {p["id"] for p in subscriber.payloads("/anomaly")} == {first, later}, 30)
        assert publisher.flush(10)
    finally:
        publisher.stop()
        subscriber.close()
        engine.dispose()
