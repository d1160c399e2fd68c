"""MQTT image source (`kind = "mqtt"`): each message on the subscribed topic(s) is one encoded image.

uri: `mqtt://[user[:password]@]host[:port]/topic/with/+/wildcards` (`mqtts://` for TLS; a literal `#` wildcard
may be written as is or as `%23`). paho-mqtt 2 with MQTT v5, QoS 1 and a persistent session: a stable client id
(`client_id` option, default `anomalyd-<hostname>-<source id>`), clean_start=False and a session expiry
(`session_expiry_s`, default 7 days), so the broker queues messages while the daemon is away. Messages are
acknowledged (PUBACK, manual ack) only in `on_done(True)`, after the result is committed: a message in flight when
the daemon dies is redelivered by the broker on the next connection. The broker never has more than
`receive_maximum` (default: the queue size) unacknowledged messages in flight to us, which bounds memory.
The client id must be unique on the broker: a second daemon with the same source id on the same host would take
the session over (MQTT v5 "Session taken over"); the source says so once (ERROR, naming the client id) and then
retries only every `backoff_max_s` instead of kicking the other one off every second. Give each its `client_id`.

frame_id: the MQTT v5 user property `frame_id` if the publisher set one (recommended: the producer knows its
captures; the DB keeps one row per id, a reused id with other bytes is recorded as a conflict), else
`"<source>:<topic>:<sha1(payload)[:16]>:<arrival time ns>"`: every message is inspected, even one whose bytes equal
an earlier message's (before or after a restart). Only a provable redelivery gets the id it had: the broker
resending (DUP flag) a packet id this process received and has not acknowledged yet; the writer then acknowledges it
without a second row, logs it and counts it (`anomalyd_frames_deduplicated_total`). Without a producer `frame_id`,
a message committed but not yet acknowledged when the daemon died is inspected again after the restart (at least
once; its row has `meta.mqtt_dup = true`).
Options: `topics` (a list, instead of / in addition to the uri's topic), `client_id`, `qos` (1),
`session_expiry_s`, `receive_maximum`, `keepalive` (30), `username`/`password` (else from the uri), `tls`,
`backoff_initial_s` (1), `backoff_max_s` (30), `max_bytes` (256 MiB: a bigger payload is a rejected frame).
"""

from __future__ import annotations

import collections
import hashlib
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from adapters.sources.base import Frame, SourceSettings, SourceStatus
from adapters.sources.registry import SourceContext, register_source_kind
from adapters.sources.settings import MqttSourceSettings
from adapters.sources.source import FrameSource
from adapters.timeutil import utc_now

UNACKED_IDS = 65535  # at most one per MQTT packet id
SESSION_TAKEN_OVER = 142  # MQTT v5 DISCONNECT reason code: another client connected with our client id
SHORT_S, SHORT_IN_A_ROW = 5.0, 3  # connections closed by the broker this soon, this many times: a takeover


@dataclass(frozen=True)
class MqttTarget:
    host: str
    port: int
    topics: tuple[str, ...]
    tls: bool
    username: str | None = None
    password: str | None = None


def parse_mqtt_uri(uri: str) -> MqttTarget:
    """`mqtt://user:pw@host:1883/a/+/b` → host, port, topic. Done by hand: `#` is a URL fragment to urllib."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"MQTT source uri {uri!r} must look like mqtt://host:port/topic")
    authority, _, topic = rest.partition("/")
    username = password = None
    if "@" in authority:
        credentials, _, authority = authority.rpartition("@")
        username, _, password = credentials.partition(":")
        username, password = unquote(username), (unquote(password) if password else None)
    host, _, port = authority.partition(":")
    tls = scheme in ("mqtts", "ssl")
    if not host:
        raise ValueError(f"MQTT source uri {uri!r} has no host")
    try:
        port_number = int(port) if port else (8883 if tls else 1883)
    except ValueError:
        raise ValueError(f"MQTT source uri {uri!r}: bad port {port!r}") from None
    topic = topic.replace("%23", "#").replace("%2B", "+").replace("%2b", "+")
    return MqttTarget(host, port_number, (topic,) if topic else (), tls, username, password)


def mqtt_frame_id(source_id: str, topic: str, payload: bytes) -> str:
    return f"{source_id}:{topic}:{hashlib.sha1(payload).hexdigest()[:16]}"


@register_source_kind("mqtt", settings=MqttSourceSettings)
class MqttImageSource(FrameSource):
    spec: MqttSourceSettings

    def __init__(self, spec: MqttSourceSettings, *, mqtt_username: str | None = None, mqtt_password: Any = None,
                 **kwargs) -> None:
        super().__init__(spec, **kwargs)
        spec = self.spec
        target = parse_mqtt_uri(str(spec.uri))
        topics = target.topics + tuple(spec.topics)
        if not topics:
            raise ValueError(f"mqtt source {spec.id!r}: no topic in uri {spec.uri!r} and no `topics` option")
        self.target = target
        self.topics = topics
        self.qos = spec.qos
        self.client_id = spec.client_id or f"anomalyd-{socket.gethostname()}-{spec.id}"
        self.session_expiry_s = spec.session_expiry_s
        self.receive_maximum = spec.receive_maximum or self.queue.maxsize
        self.keepalive = spec.keepalive
        password = spec.password or target.password or mqtt_password
        self.username = spec.username or target.username or mqtt_username
        self.password = password.get_secret_value() if hasattr(password, "get_secret_value") else password
        self.tls = target.tls if spec.tls is None else spec.tls
        self.backoff_initial_s = spec.backoff_initial_s
        self.backoff_max_s = spec.backoff_max_s
        self._inbox: collections.deque[Frame] = collections.deque()
        self._inbox_ready = threading.Condition()
        self._client: mqtt.Client | None = None
        self._connection = 0  # incremented per connection: a PUBACK mid is only valid on its own connection
        self._subscribe_mid: int | None = None  # the SUBSCRIBE of the current connection (its SUBACK: online)
        self._ever_connected = False
        self.takeovers = 0  # times another client with our client id took the session over
        self._connected_at: float | None = None  # monotonic, while connected
        self._short_connections = 0  # broker-closed connections in a row that lasted less than SHORT_S
        self.max_bytes = spec.max_bytes
        # The frame_id and payload hash of each packet id received and not acknowledged yet (this process's
        # session, across reconnections): the broker redelivers exactly these, with the DUP flag.
        self._ids_lock = threading.Lock()
        self._unacked: collections.OrderedDict[int, tuple[str, str]] = collections.OrderedDict()

    @classmethod
    def from_context(cls, settings: SourceSettings, context: SourceContext) -> MqttImageSource:
        return cls(settings, queue_size=context.queue_size, on_status=context.on_status,  # type: ignore[arg-type]
                   mqtt_username=context.mqtt_username, mqtt_password=context.mqtt_password)

    # -- paho callbacks (paho's network thread) --------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._error(f"MQTT broker {self.target.host}:{self.target.port} refused the connection: {reason_code}")
            return
        if self._ever_connected:
            self.counters.incr("reconnects")
        self._ever_connected = True
        self._connected_at = time.monotonic()
        self._connection += 1
        _, self._subscribe_mid = client.subscribe([(topic, self.qos) for topic in self.topics])
        self.log.info("connected to %s:%s as %s (session present: %s)", self.target.host, self.target.port,
                      self.client_id, flags.session_present)

    def _on_subscribe(self, client: mqtt.Client, userdata, mid, reason_codes, properties) -> None:
        # Online once the broker has granted the subscriptions (SUBACK), not when SUBSCRIBE is sent: a message
        # published from then on reaches us.
        if mid != self._subscribe_mid:
            return
        refused = [f"{topic}: {code}" for topic, code in zip(self.topics, reason_codes, strict=False)
                   if code.is_failure]
        if refused:
            self._error(f"MQTT broker {self.target.host}:{self.target.port} refused the subscription "
                        f"({', '.join(refused)})")
            return
        self._set_status(SourceStatus.ONLINE)

    def _on_connect_fail(self, client: mqtt.Client, userdata) -> None:
        self.counters.incr("reconnects")
        self._error(f"cannot connect to MQTT broker {self.target.host}:{self.target.port}")
        self._set_status(SourceStatus.OFFLINE)

    def _on_disconnect(self, client: mqtt.Client, userdata, flags, reason_code, properties) -> None:
        lasted = time.monotonic() - self._connected_at if self._connected_at is not None else None
        self._connected_at = None
        if self._stop_event.is_set():
            self._set_status(SourceStatus.OFFLINE)
            return
        # Closed by the broker right after it accepted us, again and again (Mosquitto says nothing, other brokers
        # "Session taken over"): another client uses our client id.
        self._short_connections = self._short_connections + 1 if lasted is not None and lasted < SHORT_S else 0
        if getattr(reason_code, "value", None) == SESSION_TAKEN_OVER or self._short_connections >= SHORT_IN_A_ROW:
            self._taken_over(client, reason_code)
        else:
            if self.takeovers and lasted is not None:  # connected for a while: the other client is gone
                client.reconnect_delay_set(min_delay=max(1, int(self.backoff_initial_s)),
                                           max_delay=int(self.backoff_max_s))
            self._error(f"disconnected from MQTT broker {self.target.host}:{self.target.port}: {reason_code}")
        self._set_status(SourceStatus.OFFLINE)

    def _taken_over(self, client: mqtt.Client, reason_code: Any) -> None:
        """Another client connected with our client id (a second daemon with this source id on the host): the
        broker gave it the session. Said once; from then on we retry only every backoff_max_s, so the two do not
        kick each other off every second."""
        self.takeovers += 1
        self.counters.incr("errors")
        self.last_error = (f"MQTT client id {self.client_id!r} taken over by another client at "
                           f"{self.target.host}:{self.target.port} ({self.takeovers}x)")
        if self.takeovers == 1:
            self.log.error("source %s: the broker %s:%s keeps closing our connection right after accepting it "
                           "(%s): probably another client uses the same client id %r and takes the session over "
                           "(a second daemon with source id %r on this host?); each daemon needs its own "
                           "`client_id` option. Retrying every %ss", self.id, self.target.host, self.target.port,
                           reason_code, self.client_id, self.id, self.backoff_max_s)
        slow = max(1, int(self.backoff_max_s))
        client.reconnect_delay_set(min_delay=slow, max_delay=slow)

    def _on_message(self, client: mqtt.Client, userdata, message: mqtt.MQTTMessage) -> None:
        connection, mid, qos = self._connection, message.mid, message.qos
        # Contained: an exception here would end paho's network thread (no more messages, no acks).
        frame = self._contained_frame(
            lambda: self._make_frame(message), frame_id=f"{self.id}:mqtt:{connection}:{mid}:{utc_now().timestamp()}",
            name="mqtt message", on_done=lambda ok: self._finish(ok, connection, mid, qos))
        with self._inbox_ready:
            self._inbox.append(frame)
            self._inbox_ready.notify()

    def _arrival_frame_id(self, message: mqtt.MQTTMessage, payload: bytes) -> str:
        """Without a producer's frame_id: a new id per message (the payload's hash plus the arrival time), except
        for the broker's redelivery (DUP) of a packet id we hold unacknowledged with the same bytes: its id."""
        digest = hashlib.sha1(payload).hexdigest()
        with self._ids_lock:
            held = self._unacked.get(message.mid)
            if message.dup and held is not None and held[1] == digest:
                return held[0]
            frame_id = f"{mqtt_frame_id(self.id, message.topic, payload)}:{time.time_ns()}"
            self._unacked[message.mid] = (frame_id, digest)
            self._unacked.move_to_end(message.mid)
            while len(self._unacked) > UNACKED_IDS:
                self._unacked.popitem(last=False)
        return frame_id

    def _make_frame(self, message: mqtt.MQTTMessage) -> Frame:
        frame_id = None
        content_type = None
        props = getattr(message, "properties", None)
        if props is not None:
            for key, value in getattr(props, "UserProperty", None) or []:
                if key == "frame_id" and value:
                    frame_id = value
            content_type = getattr(props, "ContentType", None)
        payload = bytes(message.payload)
        meta = self._base_meta()
        meta.update(topic=message.topic, qos=message.qos, retain=bool(message.retain), mid=message.mid,
                    content_type=content_type or "application/octet-stream")
        if message.dup:
            meta["mqtt_dup"] = True
        if len(payload) > self.max_bytes:
            meta["error"] = f"payload is {len(payload)} bytes, more than max_bytes = {self.max_bytes}"
        frame = Frame(frame_id=frame_id or self._arrival_frame_id(message, payload), source_id=self.id,
                      captured_at=utc_now(), data=None if "error" in meta else payload,
                      name=f"mqtt:{message.topic}", meta=meta)
        connection, mid, qos = self._connection, message.mid, message.qos
        frame.on_done = lambda ok: self._finish(ok, connection, mid, qos)
        return frame

    def _finish(self, ok: bool, connection: int, mid: int, qos: int) -> None:
        """PUBACK after the commit. Not on a later connection (the mid may belong to another message there): the
        broker redelivers the message on reconnection instead and the DB dedupes it."""
        client = self._client
        if not ok or qos == 0 or client is None or connection != self._connection or not client.is_connected():
            return
        client.ack(mid, qos)
        with self._ids_lock:  # acknowledged: the broker never resends this packet id's message
            self._unacked.pop(mid, None)

    # -- thread ----------------------------------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=mqtt.MQTTProtocolVersion.MQTTv5, manual_ack=True)
        if self.username:
            client.username_pw_set(self.username, self.password)
        if self.tls:
            client.tls_set(cert_reqs=ssl.CERT_REQUIRED)
        client.reconnect_delay_set(min_delay=max(1, int(self.backoff_initial_s)), max_delay=int(self.backoff_max_s))
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _run(self) -> None:
        client = self._client = self._make_client()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry_s
        props.ReceiveMaximum = max(1, min(self.receive_maximum, 65535))
        client.connect_async(self.target.host, self.target.port, keepalive=self.keepalive, clean_start=False,
                             properties=props)
        client.loop_start()
        try:
            while not self._stop_event.is_set():
                with self._inbox_ready:
                    if not self._inbox:
                        self._inbox_ready.wait(0.2)
                    frame = self._inbox.popleft() if self._inbox else None
                if frame is not None and not self._emit(frame):
                    break
        finally:
            client.disconnect()
            client.loop_stop()
            # Unacknowledged messages left in the inbox are redelivered by the broker next time.
            with self._inbox_ready:
                self._inbox.clear()

    def _on_stop(self) -> None:
        with self._inbox_ready:
            self._inbox_ready.notify_all()
