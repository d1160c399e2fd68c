"""Outbox order: every sink delivers alerts in the order they were committed (`outbox.seq`), also when hundreds
of rows share one transaction and one timestamp, and when writers commit at the same time (SQLite, PostgreSQL).

The ids are chosen to sort against their commit order, and all rows share one `created_at`: ordering by
`(created_at, id)`, as before `seq`, delivers them backwards.
"""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa
from alembic import command

from adapters.db import OutboxMessage, make_engine, make_session_factory, pending_outbox, upgrade
from adapters.db.migrate import alembic_config
from adapters.events import INSPECTION, inspection_body
from adapters.mqtt import MqttPublisher, MqttSettings
from adapters.webhooks import WebhookRelay, WebhookTarget
from tests.adapters.test_mqtt import Subscriber
from tests.waiting import wait_until
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.services

COUNT = 300


def add_alerts_in_one_transaction(sessions, count: int = COUNT, *, tag: str = "") -> list[str]:
    """`count` alerts in one transaction, one timestamp, ids in descending lexical order; returns the ids."""
    same_time = datetime.now(timezone.utc)
    ids = [f"{count - index:06d}{tag}-{uuid.uuid4().hex[:8]}" for index in range(count)]
    with sessions() as session, session.begin():
        for alert_id in ids:
            session.add(OutboxMessage(id=alert_id, event_type=INSPECTION, created_at=same_time, body=inspection_body(
                inspection_id=1, frame_id="f", captured_at=same_time, source="cam1", line="line1", score=0.9,
                threshold=0.5, model_version="v1", regions=[])))
    return ids


@pytest.fixture(params=["sqlite", "postgresql"])
def any_sessions(request, tmp_path):
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path}/order.db")
    else:
        server = request.getfixturevalue("postgres")
        engine = make_engine(server.create_database(f"order_{uuid.uuid4().hex[:8]}"))
    upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


def test_pending_rows_come_in_commit_order_within_one_transaction(any_sessions):
    first = add_alerts_in_one_transaction(any_sessions, tag="a")
    second = add_alerts_in_one_transaction(any_sessions, 50, tag="b")
    with any_sessions() as session:
        rows = pending_outbox(session, limit=1000)
    assert [row.id for row in rows] == first + second
    assert [row.seq for row in rows] == sorted(row.seq for row in rows)
    assert len({row.seq for row in rows}) == len(rows)


def test_concurrent_writers_get_distinct_increasing_numbers(any_sessions):
    """Four threads commit small transactions at once: no number twice, each writer's rows in its own order."""
    errors: list[BaseException] = []
    written: dict[str, list[str]] = {}

    def writer(tag: str) -> None:
        try:
            written[tag] = [alert for _ in range(10) for alert in add_alerts_in_one_transaction(any_sessions, 5, tag=tag)]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(f"w{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    with any_sessions() as session:
        rows = pending_outbox(session, limit=1000)
    assert len(rows) == 200 and len({row.seq for row in rows}) == 200
    for tag, ids in written.items():
        assert [row.id for row in rows if tag in row.id] == ids


def test_webhook_delivers_hundreds_of_alerts_of_one_transaction_in_order(sqlite_sessions):
    receiver = Receiver()
    relay = WebhookRelay([WebhookTarget(name="plant", url=receiver.url, allow_private=True, timeout_s=5)],
                         sqlite_sessions, poll_interval_s=0.05)
    relay.start()
    try:
        ids = add_alerts_in_one_transaction(sqlite_sessions)
        relay.notify()
        assert relay.flush(120)
        assert receiver.ids() == ids
    finally:
        relay.stop()
        receiver.stop()


def test_mqtt_delivers_hundreds_of_alerts_of_one_transaction_in_order(mosquitto, sqlite_sessions):
    subscriber = Subscriber(mosquitto.port)
    publisher = MqttPublisher(MqttSettings(host="127.0.0.1", port=mosquitto.port,
                                           client_id=f"anomalyd-order-{uuid.uuid4().hex[:6]}"), sqlite_sessions)
    publisher.start()
    try:
        ids = add_alerts_in_one_transaction(sqlite_sessions)
        publisher.notify()
        assert wait_until(lambda: len(subscriber.payloads("/anomaly")) >= COUNT, 120)
        assert [payload["id"] for payload in subscriber.payloads("/anomaly")] == ids
    finally:
        publisher.stop()
        subscriber.close()


def test_migration_numbers_existing_rows_in_their_old_order(tmp_path):
    """A database at revision 0003 with pending rows: after the upgrade they keep (created_at, id) order, and new
    rows come after them."""
    engine = make_engine(f"sqlite:///{tmp_path}/old.db")
    command.upgrade(alembic_config(engine), "0003_webhooks")
    outbox = sa.table("outbox", sa.column("id"), sa.column("topic"), sa.column("payload"), sa.column("qos"),
                      sa.column("created_at"), sa.column("attempts"))
    old = [("b", "2026-12-01 10:00:01"), ("a", "2026-12-01 10:00:02"), ("c", "2026-12-01 10:00:00")]
    with engine.begin() as connection:
        connection.execute(outbox.insert(), [{"id": i, "topic": "t", "payload": "{}", "qos": 1, "created_at": when,
                                               "attempts": 0} for i, when in old])
    upgrade(engine)
    sessions = make_session_factory(engine)
    new = add_alerts_in_one_transaction(sessions, 3)
    with sessions() as session:
        assert [row.id for row in pending_outbox(session)] == ["c", "b", "a", *new]
    engine.dispose()
