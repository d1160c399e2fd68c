"""Neutral outbox events: what happened, stored once for every sink (the `outbox` table, adapters/db/schema.py).

The daemon stores each event as an `event_type` and a sink-independent JSON `body`; it knows nothing of topics,
HTTP headers or OPC UA nodes. Each sink formats its own message from the event (`adapters.mqtt.mqtt_message`,
`adapters.webhooks.webhook_request`; OPC UA its variables, `adapters.opcua_view.OpcUaView.event`) and keeps its own
cursor (`sink_cursors`). The event types and their bodies:

- `inspection`: an anomalous inspection (an alert): `inspection_id`, `frame_id`, `captured_at` (RFC 3339),
  `source`, `line`, `verdict`, `score`, `threshold`, `model_version`, `regions`, `artifacts` (the stored files:
  `mask`, `heatmap`, `frame`, relative to the data directory, and the API's `mask_url`, `heatmap_url`).
- `threshold`: a change of a source's thresholds: `line` and `change` (the `threshold_history` row as the
  daemon reports it, daemon/references/thresholds.py).
- `drift`: a source's drift started or ended (daemon/zero_label/drift.py): `state`, `drift_id`, `source`, `line`, ...
- `result`: a trigger's answer (daemon/plant/trigger.py): `trigger_id`, `part_id`, `source`, `line`, `result`, ...
- `geometry`: a change of a source's frame geometry (daemon/references/geometry_events.py): `event`, `source`, `line`,
  `action`, `set_by`, `set_at`, `geometry`, `before`, `after`.
- `mqtt`: a row written before the outbox was neutral (migration 0007): `topic`, `payload` (the JSON text, as
  published then), `qos`, `retain`. Every sink still delivers it: MQTT as it was, webhooks as they did.

`contract_message(event)` is the documented JSON message of an event (../shared/spec/interfaces.md): the MQTT
payload and the webhook body are the same document, so both formatters start from it; the message's `id` is the
outbox row's id (what consumers dedupe on).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from adapters.timeutil import rfc3339

INSPECTION = "inspection"
THRESHOLD = "threshold"
DRIFT = "drift"
RESULT = "result"
GEOMETRY = "geometry"
LEGACY_MQTT = "mqtt"
EVENT_TYPES = (INSPECTION, THRESHOLD, DRIFT, RESULT, GEOMETRY, LEGACY_MQTT)

# The contract's message kind (the MQTT topic's last level, the webhook's `X-Anomalyd-Event`) of each event type.
MESSAGE_KIND = {INSPECTION: "anomaly", THRESHOLD: "threshold", DRIFT: "drift", RESULT: "result", GEOMETRY: "geometry"}


@dataclass(frozen=True)
class OutboxEvent:
    """One outbox row as the sinks read it."""

    id: str
    seq: int
    event_type: str
    body: dict[str, Any]
    inspection_id: int | None = None


def inspection_body(*, inspection_id: int, frame_id: str, captured_at: datetime, source: str, line: str,
                    score: float, threshold: float, model_version: str, regions: list[dict[str, Any]],
                    is_anomalous: bool | None = True, mask_path: str | None = None,
                    heatmap_path: str | None = None, frame_path: str | None = None) -> dict[str, Any]:
    """The body of an `inspection` event (an alert)."""
    verdict = "no_decision" if is_anomalous is None else "anomalous" if is_anomalous else "normal"
    return {
        "inspection_id": inspection_id, "frame_id": frame_id, "captured_at": rfc3339(captured_at),
        "source": source, "line": line, "verdict": verdict, "score": float(score), "threshold": float(threshold),
        "model_version": model_version, "regions": regions,
        "artifacts": {"mask": mask_path, "heatmap": heatmap_path, "frame": frame_path,
                      "mask_url": f"/api/inspections/{inspection_id}/mask.png",
                      "heatmap_url": f"/api/inspections/{inspection_id}/heatmap.jpg"},
    }


def threshold_body(change: dict[str, Any], line: str) -> dict[str, Any]:
    """The body of a `threshold` event: the history row as reported (`change`) and the source's line."""
    return {"line": line, "change": change}


def without_id(message: dict[str, Any]) -> dict[str, Any]:
    """A message's fields but its `id` (the outbox row's id, given back by `contract_message`): a drift's or a
    trigger answer's body."""
    return {key: value for key, value in message.items() if key != "id"}


def alert_message(alert_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """The contract's alert on `<prefix>/<line>/<source>/anomaly`."""
    artifacts = body.get("artifacts") or {}
    inspection_id = body["inspection_id"]
    return {
        "id": alert_id,
        "inspection_id": inspection_id,
        "frame_id": body["frame_id"],
        "ts": body["captured_at"],
        "source": body["source"],
        "line": body["line"],
        "score": round(float(body["score"]), 6),
        "threshold": float(body["threshold"]),
        "model_version": body["model_version"],
        "regions": body["regions"],
        "mask_url": artifacts.get("mask_url") or f"/api/inspections/{inspection_id}/mask.png",
        "heatmap_url": artifacts.get("heatmap_url") or f"/api/inspections/{inspection_id}/heatmap.jpg",
    }


def threshold_message(message_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """The contract's threshold change on `<prefix>/<line>/<source>/threshold`: the history row (its id as
    `change_id`), `event` "threshold", the source's line and the message id."""
    change = body["change"]
    return {**change, "change_id": change["id"], "id": message_id, "event": "threshold", "line": body["line"]}


def contract_message(event: OutboxEvent) -> tuple[str, dict[str, Any] | None, str]:
    """(message kind, the JSON document or None when it is not an object, its serialized text) of `event`.

    The text is what MQTT publishes and webhooks POST (and sign); a legacy `mqtt` row gives back its stored text
    unchanged, byte for byte.
    """
    body = event.body
    if event.event_type == LEGACY_MQTT:
        text = str(body["payload"])
        try:
            document = json.loads(text)
        except ValueError:
            document = None
        return str(body["topic"]).rsplit("/", 1)[-1], document if isinstance(document, dict) else None, text
    if event.event_type == INSPECTION:
        document = alert_message(event.id, body)
    elif event.event_type == THRESHOLD:
        document = threshold_message(event.id, body)
    elif event.event_type in (DRIFT, RESULT, GEOMETRY):
        document = {"id": event.id, **body}
    else:
        raise ValueError(f"unknown outbox event type {event.event_type!r} (outbox row {event.id})")
    return MESSAGE_KIND[event.event_type], document, json.dumps(document, separators=(",", ":"))

