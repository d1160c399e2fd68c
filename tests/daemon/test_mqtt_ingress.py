"""The MQTT image source in the daemon, against a real Mosquitto: an identical payload is a new frame (before and
after a restart), only the broker's provable redelivery is deduplicated (logged and counted)."""

from __future__ import annotations

import json
import time
import uuid

import cv2
import numpy as np
import pytest
from sqlalchemy import select

from adapters.db import Inspection, ModelVersion
from adapters.mqtt_commands import sign_command
from adapters.sources import build_source
from daemon.config.settings import ConfigError, load_config
from daemon.process.service import Service
from tests.adapters.test_mqtt import Subscriber
from tests.adapters.test_sources_mqtt import Publisher, wait_online
from tests.daemon.test_pipeline import BrightnessDetector, png
from tests.hardening.helpers import make_pipeline, rows
from tests.waiting import take, wait_until

pytestmark = pytest.mark.services


def jpeg(value: int) -> bytes:
    ok, buffer = cv2.imencode(".jpg", np.full((24, 32, 3), value, np.uint8))
    assert ok
    return buffer.tobytes()


def mqtt_source_config(tmp_path, mosquitto, topic: str, client_id: str) -> None:
    (tmp_path / "config.toml").write_text(f"""
[runtime]
max_batch_size = 4
max_batch_delay_ms = 10
[[sources]]
id = "cams"
kind = "mqtt"
uri = "mqtt://127.0.0.1:{mosquitto.port}/{topic}"
line = "l1"
client_id = "{client_id}"
[mqtt]
enabled = false
[database]
url = "sqlite:///var/anomalyd.db"
[storage]
dir = "var/artifacts"
[api]
bind = "127.0.0.1:0"
""")


def start(tmp_path) -> Service:
    service = Service(load_config(tmp_path / "config.toml", environ={}), detector=BrightnessDetector())
    service.start()
    return service


def inspections(service: Service) -> list[Inspection]:
    with service.sessions() as session:
        found = list(session.scalars(select(Inspection).order_by(Inspection.id)))
        session.expunge_all()
    return found


def test_an_identical_payload_is_inspected_again_within_a_run_and_after_a_restart(tmp_path, mosquitto):
    topic = f"t{uuid.uuid4().hex[:6]}/cam1/image"
    mqtt_source_config(tmp_path, mosquitto, topic, f"ingress-{uuid.uuid4().hex[:6]}")
    payload = jpeg(200)
    publisher = Publisher(mosquitto.port)
    service = start(tmp_path)
    try:
        wait_online(service.sources[0])
        publisher.publish(topic, payload)
        publisher.publish(topic, payload)  # a second capture that happens to have the same bytes
        assert wait_until(lambda: len(inspections(service)) == 2, 60)
    finally:
        service.stop()
    service = start(tmp_path)  # the restart that used to drop it (same hash id, "already inspected")
    try:
        wait_online(service.sources[0])
        publisher.publish(topic, payload)
        assert wait_until(lambda: len(inspections(service)) == 3, 60)
        deduplicated = service.metrics.registry.get_sample_value("anomalyd_frames_deduplicated_total",
                                                                 {"source": "cams"})
    finally:
        service.stop()
        publisher.close()
    rows = inspections(service)
    assert len({row.frame_id for row in rows}) == 3
    assert all(row.meta.get("content_sha1") == rows[0].meta.get("content_sha1") for row in rows)
    assert deduplicated in (None, 0.0)


def test_the_brokers_redelivery_of_an_unacknowledged_message_keeps_its_frame_id(mosquitto):
    """Provable: the same packet id, resent with the DUP flag, while this process still holds it unacknowledged."""
    prefix = f"t{uuid.uuid4().hex[:6]}"
    source = build_source({"id": "mq", "kind": "mqtt", "uri": f"mqtt://127.0.0.1:{mosquitto.port}/{prefix}/+/image",
                           "line": "l1", "client_id": f"redeliver-{prefix}", "backoff_initial_s": 0.2},
                          queue_size=8)
    source.start()
    publisher = Publisher(mosquitto.port)
    try:
        wait_online(source)
        publisher.publish(f"{prefix}/cam1/image", b"same bytes")
        (first,) = take(source, 1)
        publisher.close()
        mosquitto.stop()  # the connection breaks before the PUBACK; the session survives (persistence)
        mosquitto.start()
        (again,) = take(source, 1, timeout=60)
        again.done(True)
        publisher = Publisher(mosquitto.port)
        publisher.publish(f"{prefix}/cam1/image", b"same bytes")  # a new message: a new frame
        (new,) = take(source, 1)
        new.done(True)
    finally:
        publisher.close()
        source.stop()
    assert again.meta.get("mqtt_dup") is True and again.frame_id == first.frame_id
    assert new.frame_id != first.frame_id and "mqtt_dup" not in new.meta


def test_two_daemons_with_the_same_source_id_say_so_once_and_stop_fighting(mosquitto, caplog):
    """Two processes' sources with one default client id (same host, same source id): the broker hands the session
    back and forth. Each says why once, and the takeovers slow down to one per backoff_max_s."""
    prefix = f"t{uuid.uuid4().hex[:6]}"
    spec = {"id": f"cam-{prefix}", "kind": "mqtt", "uri": f"mqtt://127.0.0.1:{mosquitto.port}/{prefix}/image",
            "line": "l1", "backoff_initial_s": 1, "backoff_max_s": 3}
    first, second = build_source(spec, queue_size=8), build_source(spec, queue_size=8)
    assert first.client_id == second.client_id  # the default: anomalyd-<hostname>-<source id>
    caplog.set_level("INFO")
    first.start()
    try:
        wait_online(first)
        second.start()
        assert wait_until(lambda: first.takeovers >= 1, 30)
        assert wait_until(lambda: first.takeovers + second.takeovers >= 3, 60)
        started = first.takeovers + second.takeovers
        time.sleep(6)  # a measurement window (how often they kick each other off from now on), not a sync
        fights = first.takeovers + second.takeovers - started
    finally:
        first.stop()
        second.stop()
    said = [r for r in caplog.records if "takes the session over" in r.getMessage()]
    assert len(said) <= 2 and said, [r.getMessage() for r in said]  # once per source at most, at least once
    assert first.client_id in said[0].getMessage() and "client_id" in said[0].getMessage()
    # Before: about one takeover a second each (paho's 1 s reconnect delay); now one per backoff_max_s (3 s).
    assert fights <= 6, fights


def commands_config(tmp_path, mosquitto, extra: str) -> None:
    (tmp_path / "config.toml").write_text(f"""
[mqtt]
host = "127.0.0.1"
port = {mosquitto.port}
prefix = "{tmp_path.name[-12:]}"
commands = ["activate"]
{extra}
[database]
url = "sqlite:///var/anomalyd.db"
[storage]
dir = "var/artifacts"
[api]
bind = "127.0.0.1:0"
""")


def test_commands_need_a_guard(tmp_path, mosquitto):
    commands_config(tmp_path, mosquitto, "")
    with pytest.raises(ConfigError, match="command_secret"):
        load_config(tmp_path / "config.toml", environ={})
    commands_config(tmp_path, mosquitto, 'command_guard = "broker"')
    with pytest.raises(ConfigError, match="username"):
        load_config(tmp_path / "config.toml", environ={})


def test_an_anonymous_client_cannot_activate_a_model_with_the_default_guard(tmp_path, mosquitto):
    secret = "cmd-secret-1"
    (tmp_path / "command.key").write_text(secret + "\n")
    commands_config(tmp_path, mosquitto, 'command_secret_file = "command.key"')
    service = start(tmp_path)
    prefix = tmp_path.name[-12:]
    topic = f"{prefix}/models/activate/set"
    subscriber = Subscriber(mosquitto.port, f"{prefix}/#")
    try:
        with service.sessions() as session, session.begin():
            session.add_all([ModelVersion(version="v1", kind="anomalyclip", status="active"),
                             ModelVersion(version="v2", kind="anomalyclip", status="candidate")])
        assert wait_until(lambda: service.publisher.state.connected, 30)

        def ask(payload: bytes) -> dict:
            count = len(subscriber.payloads("/models/activate/status"))
            subscriber.client.publish(topic, payload, qos=1)
            assert subscriber.wait_for(lambda: len(subscriber.payloads("/models/activate/status")) > count, 30)
            return subscriber.payloads("/models/activate/status")[-1]

        def status(version: str) -> str:
            with service.sessions() as session:
                return session.scalars(select(ModelVersion.status).where(ModelVersion.version == version)).one()

        command = json.dumps({"version": "v2"})
        assert ask(command.encode())["error"] == "unauthorized"  # what an anonymous client did before
        assert ask(sign_command("guessed", topic, command))["error"] == "unauthorized"
        assert ask(sign_command(secret, f"{prefix}/models/other/set", command))["error"] == "unauthorized"
        assert ask(sign_command(secret, topic, command, ts=int(time.time()) - 3600))["error"] == "unauthorized"
        assert status("v2") == "candidate"
        signed = sign_command(secret, topic, command)
        assert ask(signed) == {"status": "ok", "version": "v2"}
        assert status("v2") == "active"
        assert ask(signed)["error"] == "unauthorized"  # a replay
    finally:
        subscriber.close()
        service.stop()


def test_a_frame_id_already_inspected_is_acknowledged_logged_and_counted(sqlite_sessions, tmp_path, mosquitto, caplog):
    """A producer resending its frame_id with the same bytes: no second row, but a log line and a count."""
    prefix = f"t{uuid.uuid4().hex[:6]}"
    source = build_source({"id": "mq", "kind": "mqtt", "uri": f"mqtt://127.0.0.1:{mosquitto.port}/{prefix}/+/image",
                           "line": "l1", "client_id": f"dedupe-{prefix}"}, queue_size=8)
    pipeline = make_pipeline(sqlite_sessions, tmp_path, [source], BrightnessDetector())
    caplog.set_level("INFO")
    pipeline.start()
    source.start()
    publisher = Publisher(mosquitto.port)
    try:
        wait_online(source)
        publisher.publish(f"{prefix}/cam1/image", png(90), frame_id="cam1:7")
        assert wait_until(lambda: pipeline.processed == 1, 30)
        publisher.publish(f"{prefix}/cam1/image", png(90), frame_id="cam1:7")

        def deduplicated() -> float | None:
            return pipeline.metrics.registry.get_sample_value("anomalyd_frames_deduplicated_total", {"source": "mq"})

        assert wait_until(lambda: deduplicated() == 1.0, 30)
    finally:
        publisher.close()
        source.stop()
        pipeline.stop(10)
    inspections, rejected = rows(sqlite_sessions)
    assert list(inspections) == ["cam1:7"] and not rejected
    assert any("frame cam1:7 already inspected" in r.getMessage() and "redelivery" in r.getMessage()
               for r in caplog.records)
