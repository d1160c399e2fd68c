"""MQTT image source against a real Mosquitto: messages become frames; a persistent session gets the messages
published while the source was stopped, and a message that was never committed is redelivered."""

from __future__ import annotations

import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from adapters.sources import build_source
from adapters.sources.mqtt_images import mqtt_frame_id, parse_mqtt_uri
from tests.waiting import take

pytestmark = pytest.mark.services




class Publisher:
    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:6]}",
                                  protocol=mqtt.MQTTProtocolVersion.MQTTv5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes, frame_id: str | None = None) -> None:
        props = None
        if frame_id is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = ("frame_id", frame_id)
        self.client.publish(topic, payload, qos=1, properties=props).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def mqtt_source(mosquitto, prefix: str, client_id: str, **options):
    spec = {"id": "mq", "kind": "mqtt", "uri": f"mqtt://127.0.0.1:{mosquitto.port}/{prefix}/+/image",
            "line": "L4", "client_id": client_id, **options}
    return build_source(spec, queue_size=8)


def wait_online(source, timeout: float = 20) -> None:
    import time

    deadline = time.monotonic() + timeout
    while source.status.value != "online":
        assert time.monotonic() < deadline, f"not online: {source.last_error}"
        time.sleep(0.02)


def test_parse_mqtt_uri():
    target = parse_mqtt_uri("mqtts://user:p%40ss@broker.local/plant/#")
    assert (target.host, target.port, target.tls, target.topics) == ("broker.local", 8883, True, ("plant/#",))
    assert (target.username, target.password) == ("user", "p@ss")
    assert parse_mqtt_uri("mqtt://h:1999/a/%23").topics == ("a/#",)
    with pytest.raises(ValueError, match="bad port"):
        parse_mqtt_uri("mqtt://h:xx/a")


def test_messages_become_frames(mosquitto):
    prefix = f"t{uuid.uuid4().hex[:6]}"
    source = mqtt_source(mosquitto, prefix, f"src-{prefix}")
    source.start()
    publisher = Publisher(mosquitto.port)
    try:
        wait_online(source)
        publisher.publish(f"{prefix}/cam1/image", b"\xff\xd8jpeg-1", frame_id="cam1:0001")
        publisher.publish(f"{prefix}/cam2/image", b"\x89PNG-2")
        publisher.publish(f"{prefix}/cam2/other", b"not subscribed")
        first, second = take(source, 2)
        for frame in (first, second):
            frame.done(True)
        assert source.queue.get(timeout=0.3) is None
    finally:
        publisher.close()
        source.stop()
    assert (first.frame_id, first.data, first.meta["topic"]) == ("cam1:0001", b"\xff\xd8jpeg-1", f"{prefix}/cam1/image")
    assert second.frame_id.startswith(mqtt_frame_id("mq", f"{prefix}/cam2/image", b"\x89PNG-2") + ":")
    assert second.source_id == "mq" and second.meta["line"] == "L4"
    assert source.counters.frames_in == 2


def test_persistent_session_delivers_missed_and_uncommitted_messages(mosquitto):
    prefix = f"t{uuid.uuid4().hex[:6]}"
    client_id = f"src-{prefix}"
    publisher = Publisher(mosquitto.port)
    source = mqtt_source(mosquitto, prefix, client_id)
    source.start()
    try:
        wait_online(source)
        publisher.publish(f"{prefix}/cam1/image", b"committed", frame_id="m0")
        publisher.publish(f"{prefix}/cam1/image", b"in flight", frame_id="m1")
        committed, _in_flight = take(source, 2)
        committed.done(True)  # m1 is never committed: the daemon "dies" with it in its queue
    finally:
        source.stop()
    assert source.status.value == "offline"
    try:
        for i in range(2, 5):  # published while no one listens
            publisher.publish(f"{prefix}/cam1/image", f"missed {i}".encode(), frame_id=f"m{i}")
    finally:
        publisher.close()

    restarted = mqtt_source(mosquitto, prefix, client_id)
    restarted.start()
    try:
        frames = take(restarted, 4)
        for frame in frames:
            frame.done(True)
        assert restarted.queue.get(timeout=0.5) is None  # m0 was acknowledged: not redelivered
    finally:
        restarted.stop()
    assert sorted(f.frame_id for f in frames) == ["m1", "m2", "m3", "m4"]
    assert next(f for f in frames if f.frame_id == "m1").data == b"in flight"
