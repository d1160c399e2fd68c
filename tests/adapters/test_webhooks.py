"""Webhook relay against a real HTTP receiver on 127.0.0.1: every outbox message exactly once by id across a
receiver outage and a relay restart, HMAC signatures that verify, per-URL filters, and refused destinations."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from adapters.db import add_event, sink_cursor
from adapters.db.tables import WebhookEndpoint
from adapters.events import INSPECTION, RESULT, inspection_body
from adapters.webhooks import (
    SIGNATURE_HEADER,
    WebhookConfigError,
    WebhookRelay,
    WebhookTarget,
    check_destination,
    verify,
)
from tests.waiting import wait_until
from tests.webhook_receiver import Receiver

SECRET = "s3cret"


def add_alerts(sessions, count: int, *, source: str = "cam1", line: str = "line1", kind: str = "anomaly",
               result: str | None = None) -> list[str]:
    """`count` outbox events in one transaction, as the daemon writes them: alerts (`inspection` events) or trigger
    answers (`result` events)."""
    ids = []
    with sessions() as session, session.begin():
        for n in range(count):
            if kind == "anomaly":
                row = add_event(session, INSPECTION, inspection_body(
                    inspection_id=n + 1, frame_id=f"f{n}", captured_at=datetime.now(timezone.utc), source=source,
                    line=line, score=0.9, threshold=0.5, model_version="v1", regions=[]))
            else:
                row = add_event(session, RESULT, {"source": source, "line": line, "score": 0.9, "result": result})
            ids.append(row.id)
    return ids


def relay_for(sessions, *targets: WebhookTarget) -> WebhookRelay:
    relay = WebhookRelay(list(targets), sessions, poll_interval_s=0.05)
    relay.start()
    return relay


def target(receiver: Receiver, **kwargs) -> WebhookTarget:
    kwargs.setdefault("name", "plant")
    return WebhookTarget(url=receiver.url, secret=SECRET, allow_private=True, backoff_min_s=0.05,
                         backoff_max_s=0.2, timeout_s=2, **kwargs)


def test_every_alert_once_across_outage_and_restart_with_valid_signatures(sqlite_sessions):
    receiver = Receiver()
    relay = relay_for(sqlite_sessions, target(receiver))
    first = add_alerts(sqlite_sessions, 5)
    relay.notify()
    assert wait_until(lambda: len(receiver.ids()) == 5, 30)
    receiver.stop()  # outage: connection refused
    during = add_alerts(sqlite_sessions, 4)
    relay.notify()
    assert wait_until(lambda: relay.state["plant"].consecutive_failures >= 2, 30)
    assert relay.snapshot()["plant"]["last_error"]
    relay.stop()  # the daemon goes down while the receiver is still away
    more = add_alerts(sqlite_sessions, 3)
    receiver.start()  # same port
    relay = relay_for(sqlite_sessions, target(receiver))
    try:
        assert relay.flush(15)
        ids = receiver.ids()
        assert sorted(ids) == sorted(first + during + more)
        assert len(ids) == len(set(ids))  # exactly once
        assert ids == first + during + more  # in commit order
        for headers, body in receiver.bodies():
            assert verify(SECRET, body, headers[SIGNATURE_HEADER.lower()])
            assert headers["x-anomalyd-id"] == json.loads(body)["id"]
            assert headers["x-anomalyd-event"] == "anomaly"
        headers, body = receiver.bodies()[0]
        assert not verify("wrong", body, headers[SIGNATURE_HEADER.lower()])
        assert not verify(SECRET, body + b" ", headers[SIGNATURE_HEADER.lower()])
        with sqlite_sessions() as session:
            endpoint = session.get(WebhookEndpoint, "plant")
            assert endpoint.delivered == 12 and endpoint.failures >= 2
    finally:
        relay.stop()
        receiver.stop()


def test_http_errors_are_retried_until_2xx(sqlite_sessions):
    receiver = Receiver()
    receiver.status = 503
    relay = relay_for(sqlite_sessions, target(receiver))
    try:
        ids = add_alerts(sqlite_sessions, 2)
        relay.notify()
        assert wait_until(lambda: relay.state["plant"].failures >= 3, 30)
        assert relay.state["plant"].last_error == "HTTP 503"
        assert not relay.flush(0.3)
        receiver.status = 204
        assert relay.flush(10)
        assert receiver.ids() == ids
    finally:
        relay.stop()
        receiver.stop()


def test_filters_per_url(sqlite_sessions):
    all_results = Receiver()
    line2_only = Receiver()
    relay = relay_for(sqlite_sessions, target(all_results, name="all", anomalous_only=False),
                      target(line2_only, name="line2", lines=["line2"], sources=["cam2"]))
    try:
        alert1 = add_alerts(sqlite_sessions, 1, source="cam1", line="line1")
        alert2 = add_alerts(sqlite_sessions, 1, source="cam2", line="line2")
        ok2 = add_alerts(sqlite_sessions, 1, source="cam2", line="line2", kind="result", result="OK")
        ng2 = add_alerts(sqlite_sessions, 1, source="cam2", line="line2", kind="result", result="NG")
        relay.notify()
        assert relay.flush(10)
        assert all_results.ids() == alert1 + alert2 + ok2 + ng2
        assert line2_only.ids() == alert2 + ng2  # OK result filtered out (anomalous_only), cam1 filtered out
        assert relay.state["line2"].skipped == 2 and relay.state["all"].skipped == 0  # alert1, ok2
        with sqlite_sessions() as session:  # both cursors past the last row: delivered or filtered out
            assert sink_cursor(session, "webhook:line2") == sink_cursor(session, "webhook:all") == 4
    finally:
        relay.stop()
        all_results.stop()
        line2_only.stop()


def test_new_webhook_starts_from_its_registration(sqlite_sessions):
    add_alerts(sqlite_sessions, 3)  # before the webhook existed
    receiver = Receiver()
    relay = relay_for(sqlite_sessions, target(receiver))
    try:
        later = add_alerts(sqlite_sessions, 2)
        relay.notify()
        assert relay.flush(10)
        assert receiver.ids() == later
    finally:
        relay.stop()
        receiver.stop()


@pytest.mark.parametrize("url, message", [
    ("ftp://example.com/x", "scheme must be http or https"),
    ("file:///etc/passwd", "scheme must be http or https"),
    ("http://127.0.0.1:9/x", "private/loopback"),
    ("http://localhost/x", "private/loopback"),
    ("https://10.1.2.3/x", "private/loopback"),
    ("http://192.168.0.10/x", "private/loopback"),
    ("http://169.254.169.254/latest/meta-data", "private/loopback"),
    ("http://[::1]/x", "private/loopback"),
    ("http://user:pw@93.184.216.34/x", "credentials"),
])
def test_refused_destinations(url, message):
    with pytest.raises(WebhookConfigError, match=message):
        check_destination(url, allow_private=False, resolve=False)


def test_private_destinations_when_allowed_and_public_ones():
    check_destination("http://127.0.0.1:8080/hook", allow_private=True)
    check_destination("https://93.184.216.34/hook", allow_private=False)
