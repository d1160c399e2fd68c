"""MQTT: availability and status (retained), per-frame inspection messages, and the outbox relay.

The outbox (adapters/db/outbox.py) holds neutral events (adapters/events.py); `mqtt_message` is this sink's
formatter: the topic `<prefix>/<line>/<source>/<kind>`, the contract's JSON payload, the QoS and whether it is
retained. MQTT's place in the outbox is its cursor (`sink_cursors` row `mqtt`): every row up to it is acknowledged.

Delivery (the relay thread): rows after the cursor are published in `seq` order at QoS 1, up to `max_inflight` at a
time, on one connection (the broker forwards one client's QoS 1 messages in the order it sent them). PUBACKs may
come back in any order; the cursor moves to just below the oldest row still waiting for its PUBACK, so it never
passes a row the broker did not take, and is saved with each batch of PUBACKs. After a reconnect (or a restart)
everything after the cursor is published again, in order: a row whose PUBACK was lost, or that was acknowledged
while an older one was not, reaches a subscriber twice (QoS 1 is at least once), with the same `id`, on which
consumers dedupe. So every event leaves exactly once per connection and in `seq` order, and none is skipped; the
`id` makes the repeats after a broken connection harmless. The client connects asynchronously and reconnects
with back-off, so an absent broker never blocks or stops inspection.

paho-mqtt 2 callbacks run on paho's network thread while it holds its own locks; they only set flags and push
message ids onto a queue, and all bookkeeping happens on the relay thread (no lock ordering to get wrong).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from adapters.db.outbox import MQTT_SINK, count_pending_outbox, outbox_after, set_sink_cursor, sink_cursor
from adapters.events import (
    DRIFT,
    GEOMETRY,
    LEGACY_MQTT,
    THRESHOLD,
    OutboxEvent,
    alert_message,
    contract_message,
    inspection_body,
)
from adapters.mqtt_settings import MqttSettings, TlsSettings  # noqa: F401  (re-exported: the public names)
from adapters.timeutil import rfc3339

log = logging.getLogger(__name__)


# --- the MQTT contract (interfaces.md): topics and payloads ---------------------------------------------------------


def topic(prefix: str, line: str, source: str, kind: str) -> str:
    """`<prefix>/<line>/<source>/<kind>` (kind: status | inspection | anomaly | result | threshold | drift | geometry)."""
    return f"{prefix}/{line}/{source}/{kind}"


def verdict(is_anomalous: bool | None) -> str:
    """`anomalous` | `normal` | `no_decision` (is_anomalous None: the model could not judge the frame)."""
    return "no_decision" if is_anomalous is None else "anomalous" if is_anomalous else "normal"


def inspection_payload(*, inspection_id: int, frame_id: str, captured_at: datetime, source: str, line: str,
                       score: float | None, is_anomalous: bool | None, model_version: str) -> dict[str, Any]:
    """The contract's per-frame message on `<prefix>/<line>/<source>/inspection`, plus `verdict`. A frame with no
    decision has `is_anomalous` null (and `score` null when there is none), never false."""
    return {
        "id": inspection_id, "frame_id": frame_id, "ts": rfc3339(captured_at), "source": source,
        "line": line, "score": None if score is None else round(float(score), 6),
        "is_anomalous": None if is_anomalous is None else bool(is_anomalous), "verdict": verdict(is_anomalous),
        "model_version": model_version,
    }


def alert_payload(*, inspection_id: int, frame_id: str, captured_at: datetime, source: str, line: str,
                  score: float, threshold: float, model_version: str, regions: list[dict[str, Any]],
                  alert_id: str | None = None) -> dict[str, Any]:
    """The contract's alert on `<prefix>/<line>/<source>/anomaly`; `id` is what consumers dedupe on."""
    return alert_message(alert_id or str(uuid.uuid4()), inspection_body(
        inspection_id=inspection_id, frame_id=frame_id, captured_at=captured_at, source=source, line=line,
        score=score, threshold=threshold, model_version=model_version, regions=regions))


@dataclass(frozen=True)
class MqttMessage:
    topic: str
    payload: str
    qos: int
    retain: bool


RETAINED_EVENTS = (THRESHOLD, DRIFT, GEOMETRY)  # states (like `/status`): published retained, at QoS 1


def mqtt_message(event: OutboxEvent, prefix: str, qos: int) -> MqttMessage:
    """MQTT's formatter: the message of one outbox event under `prefix`; `qos` is the `[mqtt] qos` of alerts and
    trigger results (a state is QoS 1 and retained). A row from before migration 0007 is published as stored."""
    if event.event_type == LEGACY_MQTT:
        body = event.body
        return MqttMessage(str(body["topic"]), str(body["payload"]), int(body.get("qos", 1)),
                           bool(body.get("retain", False)))
    kind, document, text = contract_message(event)
    assert document is not None  # the neutral types always give an object
    retained = event.event_type in RETAINED_EVENTS
    return MqttMessage(topic(prefix, str(document["line"]), str(document["source"]), kind), text,
                       1 if retained else qos, retained)


@dataclass
class MqttState:
    connected: bool = False
    last_error: str | None = None
    connected_since: float | None = None
    alerts_published: int = 0
    inspections_published: int = 0
    inspections_dropped: int = 0
    retained: dict[str, str] = field(default_factory=dict)


class MqttPublisher:
    """One paho client plus the outbox relay thread. `start()` never blocks on the broker."""

    def __init__(
        self,
        settings: MqttSettings,
        sessions: sessionmaker[Session],
        *,
        on_alerts_sent: Callable[[int], None] | None = None,
        poll_interval_s: float = 0.5,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.on_alerts_sent = on_alerts_sent
        self.poll_interval_s = poll_interval_s
        self.state = MqttState()
        self.available_topic = f"{settings.prefix}/available"
        self._acks: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._inflight: dict[int, int] = {}  # mid → outbox seq; relay thread only
        self._cursor: int | None = None  # saved in sink_cursors: every row up to it is acknowledged
        self._acknowledged_upto = 0  # every row up to it is acknowledged (saved at the next pass when it moved)
        self._published_upto = 0  # the last seq published on this connection
        self._connection_epoch = 0  # bumped by on_connect; the relay resets in-flight state when it changes
        self._seen_epoch = 0
        self._wake = threading.Event()
        # Set when the outbox may hold rows to send (notify, flush, reconnect, periodic poll). Other wakes (the
        # PUBACKs and the per-frame QoS 0 sends paho also reports) need no database query.
        self._check_outbox = threading.Event()
        self._stopping = threading.Event()
        self._idle = threading.Event()  # set by the relay when nothing is pending or in flight
        self._thread: threading.Thread | None = None
        self.crashed: BaseException | None = None
        # Command topics (filter → handler(topic, payload)); subscribed on every connect. Handlers run on paho's
        # network thread: they must only hand the message over (the daemon queues it, bounded).
        self._subscriptions: dict[str, Callable[[str, bytes], None]] = {}
        self._client = self._make_client()

    # --- client -------------------------------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        s = self.settings
        client_id = s.client_id or f"anomalyd-{socket.gethostname()}-{os.getpid()}"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        if log.isEnabledFor(logging.DEBUG):
            # paho logs every failed reconnect as an ERROR; our own log says the broker is unreachable (with
            # backoff), so paho's lines only come through when debugging.
            client.enable_logger(logging.getLogger("paho.mqtt"))
        if s.username:
            client.username_pw_set(s.username, s.password.get_secret_value() if s.password is not None else None)
        if s.tls.enabled:
            client.tls_set(ca_certs=s.tls.ca_certs, certfile=s.tls.certfile, keyfile=s.tls.keyfile,
                           cert_reqs=ssl.CERT_NONE if s.tls.insecure else ssl.CERT_REQUIRED)
            client.tls_insecure_set(s.tls.insecure)
        client.will_set(self.available_topic, "offline", qos=1, retain=True)
        client.reconnect_delay_set(min_delay=max(1, int(s.reconnect_min_s)), max_delay=max(1, int(s.reconnect_max_s)))
        client.max_inflight_messages_set(s.max_inflight)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_connect_fail = self._on_connect_fail
        client.on_message = self._on_message
        return client

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        if getattr(reason_code, "is_failure", False):
            self.state.last_error = f"broker refused the connection: {reason_code}"
            log.warning("MQTT %s:%s refused the connection: %s", self.settings.host, self.settings.port, reason_code)
            return
        log.info("MQTT connected to %s:%s", self.settings.host, self.settings.port)
        self.state.connected = True
        self.state.connected_since = time.time()
        self.state.last_error = None
        client.publish(self.available_topic, "online", qos=1, retain=True)
        for topic, payload in list(self.state.retained.items()):
            client.publish(topic, payload, qos=1, retain=True)
        for topic_filter in list(self._subscriptions):
            client.subscribe(topic_filter, qos=1)
        self._connection_epoch += 1
        self._check_outbox.set()
        self._wake.set()

    def _on_disconnect(self, _client: Any, _userdata: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        was_connected = self.state.connected
        self.state.connected = False
        if not self._stopping.is_set() and was_connected:
            self.state.last_error = f"disconnected: {reason_code}"
            log.warning("MQTT disconnected from %s:%s (%s); alerts wait in the outbox, reconnecting",
                        self.settings.host, self.settings.port, reason_code)

    def _on_connect_fail(self, _client: Any, _userdata: Any) -> None:
        message = f"broker {self.settings.host}:{self.settings.port} unreachable"
        if self.state.last_error != message:
            log.warning("MQTT %s; inspection goes on, alerts wait in the outbox", message)
        self.state.last_error = message

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        for topic_filter, handler in list(self._subscriptions.items()):
            if mqtt.topic_matches_sub(topic_filter, message.topic):
                try:
                    handler(message.topic, bytes(message.payload))
                except Exception:
                    log.exception("MQTT command handler failed for %s", message.topic)
                return

    def subscribe(self, topic_filter: str, handler: Callable[[str, bytes], None]) -> None:
        """Receive messages on `topic_filter` (QoS 1), now and after every reconnect."""
        self._subscriptions[topic_filter] = handler
        if self.state.connected:
            self._client.subscribe(topic_filter, qos=1)

    def publish_reply(self, topic: str, payload: str) -> None:
        """A command's answer (QoS 1, not retained, not durable: the asker is connected right now)."""
        if self.state.connected:
            self._client.publish(topic, payload, qos=1)

    def _on_publish(self, _client: Any, _userdata: Any, mid: int, reason_code: Any, _props: Any) -> None:
        if not getattr(reason_code, "is_failure", False):
            self._acks.put(mid)
            self._wake.set()

    # --- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        s = self.settings
        try:
            self._client.connect_async(s.host, s.port, keepalive=s.keepalive)
        except (OSError, socket.gaierror, ValueError) as exc:  # bad host name etc.: keep trying in the loop
            self.state.last_error = f"cannot connect to {s.host}:{s.port}: {exc}"
            log.warning("MQTT %s", self.state.last_error)
        self._client.loop_start()
        self._thread = threading.Thread(target=self._run_relay, name="mqtt-outbox-relay", daemon=True)
        self._thread.start()

    def flush(self, timeout: float) -> bool:
        """Wait until every outbox row is acknowledged (True) or `timeout` passes (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._idle.clear()
            self._check_outbox.set()
            self._wake.set()
            if self._idle.wait(min(0.2, max(0.0, deadline - time.monotonic()))) and self.pending() == 0:
                return True
            if self.crashed is not None:
                return False
        return self.pending() == 0

    def stop(self, timeout: float = 2.0) -> None:
        """Publish `stopped` (retained), disconnect cleanly (no Last Will), stop the threads."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.state.connected:
            info = self._client.publish(self.available_topic, "stopped", qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout)
        self._client.disconnect()
        self._client.loop_stop()
        self.state.connected = False

    # --- publishing ---------------------------------------------------------------------------------------------

    def publish_retained(self, topic: str, payload: str) -> None:
        """A retained QoS1 message, re-sent after each reconnect (status topics)."""
        self.state.retained[topic] = payload
        if self.state.connected:
            self._client.publish(topic, payload, qos=1, retain=True)

    def publish_status(self, line: str, source: str, status: str) -> None:
        self.publish_retained(f"{self.settings.prefix}/{line}/{source}/status", status)

    def publish_event(self, topic: str, payload: str | bytes) -> bool:
        """A fire-and-forget message (per-frame inspections); dropped (and counted) while disconnected."""
        if not self.state.connected:
            self.state.inspections_dropped += 1
            return False
        info = self._client.publish(topic, payload, qos=self.settings.inspection_qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self.state.inspections_dropped += 1
            return False
        self.state.inspections_published += 1
        return True

    def notify(self) -> None:
        """Outbox rows were committed: wake the relay."""
        self._check_outbox.set()
        self._wake.set()

    def pending(self) -> int:
        with self.sessions() as session:
            return count_pending_outbox(session)

    # --- relay --------------------------------------------------------------------------------------------------

    def _run_relay(self) -> None:
        try:
            failing_since: float | None = None
            while not self._stopping.is_set():
                if not self._wake.wait(self.poll_interval_s):
                    self._check_outbox.set()  # periodic poll: rows written by other processes
                self._wake.clear()
                try:
                    self._relay_once()
                except SQLAlchemyError as exc:
                    # Database unreachable: the alerts are safe in the outbox; retry until it is back.
                    if failing_since is None:
                        failing_since = time.monotonic()
                        log.warning("MQTT outbox relay cannot read the outbox (%s); retrying",
                                    str(exc).splitlines()[0][:300])
                    self._check_outbox.set()
                    self._stopping.wait(min(5.0, 0.5 + time.monotonic() - failing_since))
                else:
                    if failing_since is not None:
                        log.info("MQTT outbox relay reads the outbox again")
                        failing_since = None
        except BaseException as exc:
            self.crashed = exc
            log.exception("MQTT outbox relay crashed")
            raise

    def _relay_once(self) -> None:
        if self._cursor is None:
            with self.sessions() as session:
                self._cursor = sink_cursor(session, MQTT_SINK) or 0
            self._acknowledged_upto = self._published_upto = self._cursor
        if self._confirm_acks():
            self._check_outbox.set()  # room in flight again, and flush() waits for the count
        if self._seen_epoch != self._connection_epoch:
            # New connection: everything after the cursor is published again, in order (dedupe on id downstream).
            self._seen_epoch = self._connection_epoch
            self._inflight.clear()
            self._published_upto = self._acknowledged_upto
        if not self.state.connected or not self._check_outbox.is_set():
            return
        self._check_outbox.clear()
        room = self.settings.max_inflight - len(self._inflight)
        if room <= 0:
            return
        with self.sessions() as session:
            events = outbox_after(session, self._published_upto, limit=room)
        for event in events:
            message = mqtt_message(event, self.settings.prefix, self.settings.qos)
            info = self._client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                break  # disconnected meanwhile: published again after the reconnect
            self._inflight[info.mid] = event.seq
            self._published_upto = event.seq
        if not events and not self._inflight:
            self._idle.set()

    def _confirm_acks(self) -> bool:
        """Move the cursor past the acknowledged rows (up to the oldest one still waiting); True when any of ours
        was acknowledged."""
        acknowledged = 0
        while True:
            try:
                mid = self._acks.get_nowait()
            except queue.Empty:
                break
            if self._inflight.pop(mid, None) is not None:
                acknowledged += 1
        if acknowledged:
            self._acknowledged_upto = min(self._inflight.values()) - 1 if self._inflight else self._published_upto
            self.state.alerts_published += acknowledged
            if self.on_alerts_sent is not None:
                self.on_alerts_sent(acknowledged)
        if self._cursor is not None and self._acknowledged_upto > self._cursor:
            with self.sessions() as session, session.begin():  # raises while the database is away: next pass
                set_sink_cursor(session, MQTT_SINK, self._acknowledged_upto)
            self._cursor = self._acknowledged_upto
        return acknowledged > 0
