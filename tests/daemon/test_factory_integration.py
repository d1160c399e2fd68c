"""Factory integration with real components on loopback: trigger mode (MQTT command topics, deadline and
fail-safe), the OPC UA server (a real asyncua client), webhooks across a receiver outage and a daemon restart,
and retained source statuses after a broker restart."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from adapters.db import Inspection, OutboxMessage
from adapters.db.outbox import as_event
from adapters.events import contract_message
from adapters.sources.base import Frame, FrameQueue, SourceCounters, SourceStatus
from adapters.webhooks import SIGNATURE_HEADER, verify
from daemon.config.settings import ConfigError, load_config
from daemon.process.service import Service
from tests.adapters.test_mqtt import Subscriber
from tests.daemon.test_pipeline import BrightnessDetector, MemorySource
from tests.services import Mosquitto, free_port
from tests.waiting import wait_until
from tests.webhook_receiver import Receiver

pytestmark = [pytest.mark.services]


class LiveSource:
    """A camera stand-in: frames of one brightness (`value`) at `fps` into a `latest` queue."""

    kind = "camera"

    def __init__(self, source_id: str, line: str = "l1", value: int = 200, fps: float = 50, up: bool = True):
        self.id, self.line, self.class_name, self.threshold = source_id, line, None, 0.5
        self.value, self.fps, self.up = value, fps, up
        self.counters = SourceCounters()
        self.queue = FrameQueue(2, "latest", self.counters)
        self.status = SourceStatus.OFFLINE
        self.on_status = None
        self.last_error = None
        self._stop = threading.Event()
        self._count = 0
        self._held = False
        self._lock = threading.Lock()  # a frame is made and queued whole, or not at all once held

    def start(self) -> None:
        if not self.up:
            return  # a camera that is down at start: never comes online
        self.status = SourceStatus.ONLINE
        if self.on_status is not None:
            self.on_status(self, SourceStatus.ONLINE)
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(1 / self.fps):
            with self._lock:
                if self._held:
                    continue
                self._count += 1
                image = np.full((24, 32, 3), self.value, np.uint8)
                self.queue.put(Frame(frame_id=f"{self.id}-{time.time_ns()}-{self._count}", source_id=self.id,
                                     captured_at=datetime.now(timezone.utc), image=image, meta={"line": self.line}))

    def hold(self) -> None:
        """No frame from now on: a trigger accepted after this stays pending. A frame being made meanwhile is
        queued before this returns, so its capture time is older than any later trigger (a stale frame)."""
        with self._lock:
            self._held = True

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.status = SourceStatus.OFFLINE
        if self.on_status is not None:
            self.on_status(self, SourceStatus.OFFLINE)


class SlowDetector(BrightnessDetector):
    def __init__(self, delay_s: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.delay_s = delay_s

    def predict(self, images, class_names=None):
        time.sleep(self.delay_s)
        return super().predict(images, class_names)


def write_config(tmp_path: Path, body: str, broker_port: int | None = None) -> Path:
    mqtt = (f'[mqtt]\nhost = "127.0.0.1"\nport = {broker_port}\nclient_id = "f-{tmp_path.name[-8:]}"\n'
            # The commands' own guard (signatures) is tested in test_mqtt_ingress; here the test broker's "ACL".
            'commands = ["trigger", "activate"]\ncommand_guard = "broker"\nusername = "daemon"\n'
            ) if broker_port else "[mqtt]\nenabled = false\n"
    config = tmp_path / "config.toml"
    config.write_text(f"""
[runtime]
max_batch_size = 4
max_batch_delay_ms = 10
shutdown_grace_s = 10
[database]
url = "sqlite:///var/anomalyd.db"
[storage]
dir = "var/artifacts"
[api]
bind = "127.0.0.1:0"
{mqtt}
{body}
""")
    return config


SOURCES = """
[[sources]]
id = "press"
kind = "camera"
line = "l1"
threshold = 0.5
trigger = "{channel}"
deadline_ms = {deadline}
fail_safe = "{fail_safe}"
max_pending_triggers = 2
[[sources]]
id = "belt"
kind = "folder"
line = "l1"
threshold = 0.5
"""


def sources_config(channel: str = "mqtt", deadline: float = 5000, fail_safe: str = "NG") -> str:
    return SOURCES.format(channel=channel, deadline=deadline, fail_safe=fail_safe)


def start_service(config: Path, detector, sources) -> Service:
    service = Service(load_config(config, environ={}), detector=detector, sources=sources)
    service.start()
    return service


def rows(service: Service, source: str) -> list[Inspection]:
    with service.sessions() as session:
        return list(session.scalars(select(Inspection).where(Inspection.source == source).order_by(Inspection.id)))


def result_messages(service: Service) -> list[dict]:
    with service.sessions() as session:
        found = session.scalars(select(OutboxMessage).where(OutboxMessage.event_type == "result")
                                .order_by(OutboxMessage.seq)).all()
        return [json.loads(contract_message(as_event(row))[2]) for row in found]


def test_mqtt_trigger_round_trip_ahead_of_free_running_and_bad_input(tmp_path, mosquitto):
    config = write_config(tmp_path, sources_config("mqtt", deadline=20_000), mosquitto.port)
    press, belt = LiveSource("press", value=220), MemorySource("belt", "l1")
    subscriber = Subscriber(mosquitto.port, "anomalyd/#")
    service = start_service(config, SlowDetector(0.02, image_size=32), [press, belt])
    try:
        assert wait_until(lambda: service.publisher.state.connected, 30)
        belt.push("warm-up", image=np.full((24, 32, 3), 30, np.uint8))
        belt.wait_acks(1)  # the first frame pays for the imports
        for index in range(40):  # the free-running source keeps the worker busy
            belt.push(f"belt-{index}", image=np.full((24, 32, 3), 30, np.uint8))
        before = datetime.now(timezone.utc)
        subscriber.client.publish("anomalyd/l1/press/trigger/set", json.dumps({"part_id": "P-1"}), qos=1)
        assert subscriber.wait_for(lambda: subscriber.payloads("/press/trigger/status"), 30)
        accepted = subscriber.payloads("/press/trigger/status")[0]
        assert accepted["status"] == "accepted" and accepted["part_id"] == "P-1"
        assert subscriber.wait_for(lambda: subscriber.payloads("/press/result"), 30)
        result = subscriber.payloads("/press/result")[0]
        assert result["trigger_id"] == accepted["trigger_id"] and result["part_id"] == "P-1"
        assert result["result"] == "NG" and result["fail_safe"] is False and result["late"] is False
        row = rows(service, "press")[0]
        assert len(rows(service, "press")) == 1  # no trigger, no inspection: only the triggered frame
        assert row.id == result["inspection_id"] and row.meta["part_id"] == "P-1" and row.is_anomalous
        assert row.captured_at >= before  # a fresh frame, taken after the trigger
        assert result["score"] == pytest.approx(row.score)
        assert subscriber.wait_for(lambda: len(rows(service, "belt")) == 41, 30)  # free-running still worked

        def ask(payload: bytes | str, topic: str = "anomalyd/l1/press/trigger/set") -> dict:
            count = len(subscriber.payloads(topic.rsplit("/", 1)[0] + "/status"))
            subscriber.client.publish(topic, payload, qos=1)
            status_suffix = topic.rsplit("/", 1)[0].split("/", 1)[1] + "/status"
            assert subscriber.wait_for(lambda: len(subscriber.payloads(status_suffix)) > count, 30)
            return subscriber.payloads(status_suffix)[-1]

        assert ask(json.dumps({"part_id": 1.5}))["error"] == "bad_part_id"
        assert ask(json.dumps({"part_id": ["a"]}))["error"] == "bad_part_id"
        assert ask(b"not json")["error"] == "bad_payload"
        assert ask(json.dumps("P-2"))["status"] == "accepted"  # a bare JSON string is a part id too
        assert ask(json.dumps({"part_id": "x"}), "anomalyd/l1/belt/trigger/set")["error"] == "not_triggered"
        assert ask(json.dumps({"part_id": "x"}), "anomalyd/l1/nosuch/trigger/set")["error"] == "unknown_source"
        assert ask(json.dumps({"part_id": "x"}), "anomalyd/l9/press/trigger/set")["error"] == "unknown_source"
        assert ask(json.dumps({"version": "nope"}), "anomalyd/models/activate/set")["error"] == "unknown_version"

        # A flood: every command answered, at most max_pending_triggers (2) accepted at a time, the rest busy.
        press.hold()  # the camera stops: the accepted triggers wait for a fresh frame until the flood is over
        count = len(subscriber.payloads("/press/trigger/status"))
        for index in range(30):
            subscriber.client.publish("anomalyd/l1/press/trigger/set", json.dumps(f"F-{index}"), qos=1)
        assert subscriber.wait_for(lambda: len(subscriber.payloads("/press/trigger/status")) >= count + 30, 30)
        flood = subscriber.payloads("/press/trigger/status")[count:]
        assert sum(1 for reply in flood if reply["status"] == "accepted") <= 2
        assert sum(1 for reply in flood if reply.get("error") == "busy") >= 28
        ready = httpx.get(f"http://127.0.0.1:{service.http_port}/api/health/ready", timeout=30).json()
        assert ready["details"]["triggers"]["press"]["pending"] <= 2
        metrics = httpx.get(f"http://127.0.0.1:{service.http_port}/metrics", timeout=30).text
        assert 'anomalyd_trigger_refused_total{reason="busy",source="press"}' in metrics
    finally:
        service.stop()
        subscriber.close()


def test_deadline_miss_answers_fail_safe_and_the_late_row_still_lands(tmp_path):
    config = write_config(tmp_path, sources_config("opcua", deadline=150, fail_safe="no_decision"))
    press = LiveSource("press", value=40)
    service = start_service(config, SlowDetector(0.6, image_size=32), [press, MemorySource("belt", "l1")])
    try:
        trigger_id = service.integrations.trigger("press", "P-9", "opcua")
        assert wait_until(lambda: len(result_messages(service)) >= 2, 60)
        fail_safe, late = result_messages(service)[:2]
        assert fail_safe["trigger_id"] == late["trigger_id"] == trigger_id
        assert fail_safe["result"] == "no_decision" and fail_safe["fail_safe"] is True
        assert fail_safe["inspection_id"] is None and fail_safe["reason"] == "deadline missed"
        assert late["late"] is True and late["result"] == "OK" and late["latency_ms"] > 150
        row = rows(service, "press")[0]
        assert row.id == late["inspection_id"] and row.meta == {"trigger_id": trigger_id, "part_id": "P-9"}
        assert service.integrations.triggers.counts("press")["deadline_missed"] == 1
        metrics = service.metrics.render().decode()
        assert 'anomalyd_trigger_deadline_missed_total{source="press"} 1.0' in metrics
        assert 'anomalyd_trigger_answers_total{kind="fail_safe",result="no_decision",source="press"} 1.0' in metrics
    finally:
        service.stop()


def test_trigger_mode_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="deadline_ms needs trigger"):
        load_config(write_config(tmp_path, '[[sources]]\nid = "a"\nkind = "folder"\ndeadline_ms = 100\n'),
                    environ={})
    with pytest.raises(ConfigError, match="trigger"):
        load_config(write_config(tmp_path, '[[sources]]\nid = "a"\nkind = "folder"\ntrigger = "plc"\n'),
                    environ={})
    with pytest.raises(ConfigError, match="private/loopback"):
        load_config(write_config(tmp_path, '[[webhooks]]\nurl = "http://127.0.0.1:9/x"\n'), environ={})
    with pytest.raises(ConfigError, match="scheme must be http or https"):
        load_config(write_config(tmp_path, '[[webhooks]]\nurl = "gopher://example.com/x"\n'), environ={})
    with pytest.raises(ConfigError, match="nobody could connect"):
        load_config(write_config(tmp_path, '[opcua]\nenabled = true\n'), environ={})


# --- OPC UA -----------------------------------------------------------------------------------------------------

OPCUA = """
[opcua]
enabled = true
endpoint = "opc.tcp://127.0.0.1:{port}/anomalyd"
[[opcua.users]]
name = "plc"
password = "plc-pass"
role = "operator"
[[opcua.users]]
name = "scada"
password = "scada-pass"
role = "viewer"
"""


def test_opcua_browse_trigger_read_result_and_counters_equal_the_db(tmp_path):
    from asyncua import Client, ua

    port = free_port()
    config = write_config(tmp_path, sources_config("opcua", deadline=60_000) + OPCUA.format(port=port))
    press = LiveSource("press", value=230)
    service = start_service(config, SlowDetector(0.0, image_size=32), [press, MemorySource("belt", "l1")])
    url = f"opc.tcp://127.0.0.1:{port}/anomalyd"
    server = service.sinks.get("opcua").server
    assert wait_until(lambda: server.started, 120), server.start_error

    async def session(user: str | None, password: str | None):
        client = Client(url, timeout=10)
        if user is not None:
            client.set_user(user)
            client.set_password(password)
        return client

    async def scenario() -> dict:
        out: dict = {}
        client = await session("plc", "plc-pass")
        async with client:
            idx = await client.get_namespace_index("urn:anomalyd:machine-vision")
            root = await client.nodes.objects.get_child([f"{idx}:anomalyd"])
            sources = await root.get_child([f"{idx}:Sources"])
            out["sources"] = sorted([(await n.read_browse_name()).Name for n in await sources.get_children()])
            press_node = await sources.get_child([f"{idx}:press"])
            out["browse"] = sorted([(await n.read_browse_name()).Name for n in await press_node.get_children()])
            trigger = await press_node.get_child([f"{idx}:Trigger"])
            out["trigger_id"] = await press_node.call_method(trigger, ua.Variant("P-42", ua.VariantType.String))
            deadline = time.monotonic() + 60  # the first frame through the daemon pays for its imports
            while await (await press_node.get_child([f"{idx}:LastResult", f"{idx}:TriggerId"])).read_value() \
                    != out["trigger_id"]:
                assert time.monotonic() < deadline, "no result for the trigger"
                await asyncio.sleep(0.05)
            out["last"] = {name: await (await press_node.get_child([f"{idx}:LastResult", f"{idx}:{name}"]))
                           .read_value() for name in ("InspectionId", "PartId", "Result", "IsOk", "Score",
                                                      "Threshold", "RegionCount", "ModelVersion", "Timestamp")}
            out["counters"] = {name: await (await press_node.get_child([f"{idx}:Counters", f"{idx}:{name}"]))
                               .read_value() for name in ("Inspected", "OK", "NG", "DeadlineMissed", "Errors")}
            out["max_ms"] = await (await press_node.get_child([f"{idx}:ProcessingTime", f"{idx}:MaxMs"])).read_value()
            out["state"] = await (await press_node.get_child([f"{idx}:SystemState"])).read_value()
            # bad input: a part id of the wrong type; a free-running source; an unknown model version
            with pytest.raises(ua.UaStatusCodeError) as bad_type:
                await press_node.call_method(trigger, ua.Variant(1.5, ua.VariantType.Double))
            out["bad_type"] = bad_type.value.code
            out["last_error"] = await (await press_node.get_child([f"{idx}:LastError"])).read_value()
            belt = await sources.get_child([f"{idx}:belt"])
            with pytest.raises(ua.UaStatusCodeError) as free_running:
                await belt.call_method(await belt.get_child([f"{idx}:Trigger"]), "x")
            out["free_running"] = free_running.value.code
            with pytest.raises(ua.UaStatusCodeError) as unknown_version:
                await root.call_method(await root.get_child([f"{idx}:SelectModelVersion"]), "nope")
            out["unknown_version"] = unknown_version.value.code
            await press_node.call_method(await press_node.get_child([f"{idx}:ResetCounters"]))
            inspected = await press_node.get_child([f"{idx}:Counters", f"{idx}:Inspected"])
            deadline = time.monotonic() + 30  # the server writes the new value on its own loop, soon after
            out["after_reset"] = await inspected.read_value()
            while out["after_reset"] != 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                out["after_reset"] = await inspected.read_value()
        viewer = await session("scada", "scada-pass")
        async with viewer:
            node = await viewer.nodes.objects.get_child([f"{idx}:anomalyd", f"{idx}:Sources", f"{idx}:press"])
            out["viewer_reads"] = await (await node.get_child([f"{idx}:LastResult", f"{idx}:PartId"])).read_value()
            with pytest.raises(ua.UaStatusCodeError) as denied:
                await node.call_method(await node.get_child([f"{idx}:Trigger"]), "P-x")
            out["viewer_trigger"] = denied.value.code
        for user, password in ((None, None), ("intruder", "x"), ("plc", "wrong")):
            with pytest.raises(Exception) as refused:
                async with await session(user, password):
                    pass
            out.setdefault("refused", []).append(str(refused.value))
        return out

    try:
        out = asyncio.run(scenario())
    finally:
        service.stop()
    assert out["sources"] == ["belt", "press"]
    assert {"SystemState", "LastResult", "Counters", "ProcessingTime", "Trigger", "ResetCounters"} <= set(out["browse"])
    [row] = rows(service, "press")
    assert row.meta["trigger_id"] == out["trigger_id"]
    last = out["last"]
    assert last["InspectionId"] == row.id and last["PartId"] == "P-42" == row.meta["part_id"]
    assert last["Result"] == "NG" and last["IsOk"] is False and row.is_anomalous
    assert last["Score"] == pytest.approx(row.score) and last["Threshold"] == pytest.approx(row.threshold)
    assert last["RegionCount"] == len(row.regions) and last["ModelVersion"] == row.model_version
    assert abs((last["Timestamp"].replace(tzinfo=timezone.utc) - row.captured_at).total_seconds()) < 0.01
    with service.sessions() as s:
        belt_rows = s.scalars(select(Inspection).where(Inspection.source == "belt")).all()
    assert belt_rows == []
    assert out["counters"] == {"Inspected": 1, "OK": 0, "NG": 1, "DeadlineMissed": 0, "Errors": 0}
    assert out["max_ms"] > 0
    assert out["state"] in ("Ready", "Busy")
    assert out["bad_type"] == ua.StatusCodes.BadInvalidArgument and "bad_part_id" in out["last_error"]
    assert out["free_running"] == ua.StatusCodes.BadInvalidState
    assert out["unknown_version"] == ua.StatusCodes.BadNotFound
    assert out["after_reset"] == 0
    assert out["viewer_reads"] == "P-42" and out["viewer_trigger"] == ua.StatusCodes.BadUserAccessDenied
    assert all("BadIdentityTokenRejected" in text or "BadUserAccessDenied" in text for text in out["refused"]), \
        out["refused"]


# --- webhooks through the daemon ------------------------------------------------------------------------------------


def test_webhook_gets_every_alert_once_across_outage_and_daemon_restart(tmp_path):
    receiver = Receiver()
    config = write_config(tmp_path, f"""
[[sources]]
id = "belt"
kind = "folder"
line = "l1"
threshold = 0.5
[[webhooks]]
url = "{receiver.url}"
secret = "hook-secret"
allow_private = true
backoff_max_s = 0.3
""")

    def run(frames: range, value_of, stop_receiver: bool = False) -> Service:
        belt = MemorySource("belt", "l1")
        service = start_service(config, BrightnessDetector(image_size=32), [belt])
        if stop_receiver:
            receiver.stop()
        for index in frames:
            belt.push(f"f{index}", image=np.full((24, 32, 3), value_of(index), np.uint8))
        belt.wait_acks(len(frames))
        return service

    bright = lambda index: 220 if index % 2 == 0 else 20  # noqa: E731 - even frames are anomalous
    service = run(range(0, 10), bright)
    try:
        assert service.integrations.webhooks.flush(30)
        assert len(receiver.ids()) == 5
        receiver.stop()
        belt = service.sources[0]
        for index in range(10, 20):
            belt.push(f"f{index}", image=np.full((24, 32, 3), bright(index), np.uint8))
        belt.wait_acks(20)
        assert wait_until(lambda: service.integrations.webhooks.state[service.integrations.webhooks.targets[0].name]
                          .consecutive_failures >= 1, 30)
        ready = httpx.get(f"http://127.0.0.1:{service.http_port}/api/health/ready", timeout=30).json()
        [hook] = ready["details"]["webhooks"].values()
        assert hook["last_error"] and hook["consecutive_failures"] >= 1
        metrics = httpx.get(f"http://127.0.0.1:{service.http_port}/metrics", timeout=30).text
        assert "anomalyd_webhook_up{" in metrics and "anomalyd_webhook_failures_total{" in metrics
    finally:
        service.stop()  # the receiver is still away: the alerts wait in the outbox
    receiver.start()
    service = run(range(20, 24), bright)
    try:
        assert service.integrations.webhooks.flush(30)
        with service.sessions() as session:
            alert_ids = set(session.scalars(select(OutboxMessage.id).where(OutboxMessage.event_type == "inspection")))
        ids = receiver.ids()
        assert len(alert_ids) == 12 and set(ids) == alert_ids and len(ids) == len(set(ids))
        for headers, body in receiver.bodies():
            assert verify("hook-secret", body, headers[SIGNATURE_HEADER.lower()])
    finally:
        service.stop()
        receiver.stop()


# --- retained statuses ----------------------------------------------------------------------------------------------


def test_statuses_retained_from_start_and_republished_after_a_broker_restart(tmp_path):
    with Mosquitto() as broker:
        config = write_config(tmp_path, sources_config("mqtt"), broker.port)
        service = start_service(config, BrightnessDetector(image_size=32),
                                [LiveSource("press", up=False), MemorySource("belt", "l1")])
        try:
            assert wait_until(lambda: service.publisher.state.connected, 30)

            def retained() -> dict[str, str]:
                subscriber = Subscriber(broker.port, "anomalyd/+/+/status")
                try:
                    subscriber.wait_for(lambda: len(subscriber.messages) >= 2, 5)
                    return {t: p.decode() for t, p, r in subscriber.messages if r}
                finally:
                    subscriber.close()

            expected = {"anomalyd/l1/press/status": "offline", "anomalyd/l1/belt/status": "online"}
            assert wait_until(lambda: retained() == expected, 30)
            broker.stop()
            for path in broker.dir.glob("mosquitto.db*"):
                path.unlink()  # the broker forgets every retained message
            broker.start()
            assert wait_until(lambda: service.publisher.state.connected, 60)  # reconnect backoff: 1 s, 2 s, ...
            assert wait_until(lambda: retained() == expected, 30)
        finally:
            service.stop()
