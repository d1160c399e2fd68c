"""The MQTT sink: statuses (retained), per-frame inspection messages and the alerts' outbox relay, on one broker.

Configured by `[mqtt]` (`adapters.mqtt.MqttSettings`); the transport and the relay are `adapters.mqtt.MqttPublisher`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from adapters.mqtt import MqttPublisher, MqttSettings, inspection_payload, topic
from adapters.sinks import CommittedInspection, ResultSink, SinkContext, register_sink

log = logging.getLogger(__name__)


class MqttSink(ResultSink):
    name = "mqtt"

    def __init__(self, settings: MqttSettings, context: SinkContext) -> None:
        if context.sessions is None:
            raise ValueError("the MQTT sink needs the database (its alerts wait in the outbox)")
        self.settings = settings.resolved(context.base_dir)
        self.publisher = MqttPublisher(self.settings, context.sessions, on_alerts_sent=context.on_alerts_sent)

    def start(self) -> None:
        self.publisher.start()

    def inspection_committed(self, result: CommittedInspection) -> None:
        if not self.settings.publish_inspections:
            return
        self.publisher.publish_event(
            topic(self.settings.prefix, result.line, result.source, "inspection"),
            json.dumps(inspection_payload(
                inspection_id=result.inspection_id, frame_id=result.frame_id, captured_at=result.captured_at,
                source=result.source, line=result.line, score=result.score, is_anomalous=result.is_anomalous,
                model_version=result.model_version), separators=(",", ":")))

    def alerts_committed(self) -> None:
        self.publisher.notify()

    def source_status(self, line: str, source_id: str, status: str) -> None:
        self.publisher.publish_status(line, source_id, status)

    def flush(self, timeout: float) -> bool:
        if not self.publisher.state.connected:
            log.warning("MQTT broker unreachable at shutdown; %d alerts wait in the outbox", self.pending())
            return False
        if not self.publisher.flush(timeout):
            log.warning("%d alerts still in the outbox; they are published after the next start", self.pending())
            return False
        return True

    def pending(self) -> int:
        return self.publisher.pending()

    def health(self) -> dict[str, Any]:
        state = self.publisher.state
        details: dict[str, Any] = {"connected": state.connected, "error": state.last_error,
                                   "alerts_published": state.alerts_published}
        if not state.connected:
            details["note"] = "broker unreachable: inspection continues, alerts wait in the outbox"
        if self.publisher.crashed is not None:
            details["relay_crashed"] = repr(self.publisher.crashed)
        return details

    def problem(self) -> str | None:
        return None if self.publisher.crashed is None else f"MQTT outbox relay crashed: {self.publisher.crashed!r}"

    def stop(self, timeout: float = 2.0) -> None:
        self.publisher.stop(timeout=timeout)


@register_sink("mqtt", section="mqtt")
def build_mqtt_sink(settings: MqttSettings, context: SinkContext) -> MqttSink | None:
    return MqttSink(settings, context) if settings.enabled else None
