"""Factory integration around the pipeline: trigger mode, the OPC UA methods and counters, MQTT command topics.

One object the service creates and calls at a few points (attach before the pipeline starts, start, each committed
result, readiness, stop), so the wiring stays out of `daemon/process/service.py`:

- `TriggerController` (daemon/plant/trigger.py) for `[[sources]]` with `trigger = "opcua" | "mqtt"`; each answer (the
  real result, the fail-safe on a deadline miss, a late result) becomes an `outbox` row on
  `<prefix>/<line>/<source>/result` and the sinks are told (`alerts_committed`): the MQTT and webhook sinks
  deliver it with the outbox's guarantee, and the OPC UA sink's server shows it.
- The webhook and OPC UA sinks are result sinks (adapters/sinks/webhook.py, adapters/sinks/opcua.py) built by the
  service with the others; here the OPC UA methods are bound to the daemon and its counters kept (since start or
  reset; values only from committed rows and answers, so OPC UA never shows a result the database does not have).
- MQTT commands (`[mqtt].commands`): `<prefix>/<line>/<source>/trigger/set` with a JSON part id (a string, an
  integer, or `{"part_id": ...}`) answered on `.../trigger/status`; `<prefix>/models/activate/set` with
  `{"version": "..."}` (or a JSON string) answered on `<prefix>/models/activate/status`. Commands go through a
  bounded queue: a flood is answered `busy`, never queued without limit. Each command must pass
  `[mqtt].command_guard`: signed with `command_secret` (default, adapters/mqtt_commands.py; else answered
  `unauthorized`), or `"broker"`: the broker's authentication and ACLs decide who may publish.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timezone
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from adapters.sinks.opcua import result_word
from daemon.plant.trigger import TriggerAnswer, TriggerController, TriggerError, TriggerSettings
from daemon.telemetry.metrics import LATENCY_BUCKETS, _CallbackCollector

log = logging.getLogger("anomalyd.integrations")

COMMAND_QUEUE_SIZE = 64


@dataclass
class SourceStats:
    """Per-source counters for OPC UA (since start or the last reset)."""

    inspected: int = 0
    ok: int = 0
    ng: int = 0
    deadline_missed: int = 0
    times_ms: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])  # min, sum, max, count
    baseline: dict[str, float] = field(default_factory=dict)  # rejected/errors at the last reset

    def add_time(self, ms: float) -> None:
        t = self.times_ms
        t[0] = ms if t[3] == 0 else min(t[0], ms)
        t[1] += ms
        t[2] = max(t[2], ms)
        t[3] += 1

    def processing(self) -> dict[str, float]:
        t = self.times_ms
        return {"ProcessingTime.MinMs": t[0], "ProcessingTime.MeanMs": t[1] / t[3] if t[3] else 0.0,
                "ProcessingTime.MaxMs": t[2]}


class Integrations:
    def __init__(self, service: Any) -> None:
        self.service = service
        self.settings = service.settings
        self.metrics = service.metrics
        self.triggers: TriggerController | None = None
        self.stats: dict[str, SourceStats] = {cfg.id: SourceStats() for cfg in self.settings.sources}
        self._lock = threading.Lock()
        self._commands: queue.Queue[tuple[str, str, bytes]] = queue.Queue(maxsize=COMMAND_QUEUE_SIZE)
        self._verifier: Any = None  # adapters.mqtt_commands.CommandVerifier with command_guard = "hmac"
        self._command_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._status_thread: threading.Thread | None = None
        r = self.metrics.registry
        self.trigger_answers = Counter("anomalyd_trigger_answers", "Trigger answers by result",
                                       ["source", "result", "kind"], registry=r)
        self.trigger_refused = Counter("anomalyd_trigger_refused", "Triggers refused", ["source", "reason"],
                                       registry=r)
        self.trigger_latency = Histogram("anomalyd_trigger_latency_seconds", "From the trigger to its answer",
                                         ["source"], buckets=LATENCY_BUCKETS, registry=r)

    @property
    def opcua(self) -> Any:
        """The OPC UA sink's server (adapters.opcua.OpcUaServer), or None."""
        sink = self.service.sinks.get("opcua")
        return getattr(sink, "server", None)

    @property
    def webhooks(self) -> Any:
        """The webhook sink's relay (adapters.webhooks.WebhookRelay), or None."""
        sink = self.service.sinks.get("webhooks")
        return getattr(sink, "relay", None)

    # --- start --------------------------------------------------------------------------------------------------

    def attach(self, pipeline: Any) -> None:
        """Before the pipeline starts: trigger mode for triggered sources."""
        s = self.settings
        triggered = {
            cfg.id: TriggerSettings(source_id=cfg.id, line=cfg.line, channel=cfg.trigger,
                                    deadline_s=cfg.deadline_ms / 1000 if cfg.deadline_ms else None,
                                    fail_safe=cfg.fail_safe, max_pending=cfg.max_pending_triggers)
            for cfg in s.sources if cfg.trigger is not None
        }
        known = {source.id for source in pipeline.sources}
        for source_id, cfg in list(triggered.items()):
            if source_id not in known:
                triggered.pop(source_id)
                log.warning("triggered source %s is not run by this process", cfg.source_id)
        if triggered:
            self.triggers = TriggerController(triggered, known, on_answer=self._answer)
            pipeline.triggers = self.triggers
            self.triggers.start()

    def start(self) -> None:
        """After the pipeline: webhooks, OPC UA, MQTT command topics."""
        s = self.settings
        self.metrics.registry.register(_CallbackCollector(self._collect))
        sink = self.service.sinks.get("opcua")
        if sink is not None:
            from adapters.opcua import OpcUaHandlers

            sink.bind(OpcUaHandlers(trigger=self._opcua_trigger, select_model=self._opcua_select_model,
                                    reset_counters=self.reset_counters))
            if self.service.pipeline is not None:
                detector = self.service.pipeline.detector
                self.opcua.update("", {"ActiveModelVersion": str(getattr(detector, "version", ""))})
        publisher = self.service.publisher
        if publisher is not None and s.mqtt.commands:
            prefix = s.mqtt.prefix
            if s.mqtt.command_guard == "hmac" and s.mqtt.command_secret is not None:
                from adapters.mqtt_commands import CommandVerifier

                self._verifier = CommandVerifier(s.mqtt.command_secret.get_secret_value(), s.mqtt.command_max_age_s)
            if "trigger" in s.mqtt.commands:
                publisher.subscribe(f"{prefix}/+/+/trigger/set", self._enqueue_command("trigger"))
            if "activate" in s.mqtt.commands:
                publisher.subscribe(f"{prefix}/models/activate/set", self._enqueue_command("activate"))
            self._command_thread = threading.Thread(target=self._run_commands, name="mqtt-commands", daemon=True)
            self._command_thread.start()
            log.info("MQTT command topics enabled: %s (guard: %s)", ", ".join(s.mqtt.commands),
                     "signed (HMAC)" if self._verifier is not None else "the broker's ACLs")
        if self.opcua is not None:
            self._status_thread = threading.Thread(target=self._refresh_states, name="opcua-states", daemon=True)
            self._status_thread.start()

    # --- committed results ----------------------------------------------------------------------------------------

    def on_result(self, row: Any, created: bool) -> None:
        """A committed inspection (writer thread): counters, trigger answers, OPC UA, webhooks."""
        if created:
            stats = self.stats.setdefault(row.source, SourceStats())
            with self._lock:
                stats.inspected += 1
                if row.is_anomalous:
                    stats.ng += 1
                elif row.is_anomalous is False:  # a frame with no decision is neither
                    stats.ok += 1
                if row.processed_at is not None and row.captured_at is not None:
                    stats.add_time(max(0.0, (_aware(row.processed_at) - _aware(row.captured_at)).total_seconds()
                                       * 1000))
            if self.opcua is not None:  # the sink shows the row itself; a triggered one through its answer
                self._publish_counters(row.source)
        if self.triggers is not None:
            self.triggers.committed(row)

    @staticmethod
    def _row_values(row: Any, answer: TriggerAnswer | None) -> dict[str, Any]:
        values: dict[str, Any] = {
            "LastResult.InspectionId": row.id if row is not None else 0,
            "LastResult.PartId": (row.meta or {}).get("part_id") if row is not None and isinstance(row.meta, dict)
            else None,
            "LastResult.Result": result_word(row.is_anomalous) if row is not None else None,
            "LastResult.Score": row.score if row is not None else None,
            "LastResult.Threshold": row.threshold if row is not None else None,
            "LastResult.RegionCount": len(row.regions or []) if row is not None else 0,
            "LastResult.ModelVersion": row.model_version if row is not None else None,
            "LastResult.Timestamp": _aware(row.captured_at) if row is not None else None,
            "LastResult.TriggerId": None, "LastResult.FailSafe": False, "LastResult.Late": False,
        }
        if answer is not None:
            values.update({"LastResult.PartId": answer.request.part_id, "LastResult.Result": answer.result,
                           "LastResult.TriggerId": answer.request.id, "LastResult.FailSafe": answer.fail_safe,
                           "LastResult.Late": answer.late})
            if row is None:
                from datetime import datetime

                values["LastResult.Timestamp"] = datetime.now(timezone.utc)
        values["LastResult.IsOk"] = values["LastResult.Result"] == "OK"
        return values

    def _answer(self, answer: TriggerAnswer) -> None:
        """A trigger's answer: an outbox row (MQTT + webhooks), OPC UA, metrics."""
        from adapters.db.outbox import add_event
        from adapters.events import RESULT, without_id

        request = answer.request
        kind = "late" if answer.late else "fail_safe" if answer.fail_safe else "result"
        self.trigger_answers.labels(request.source_id, answer.result, kind).inc()
        if not answer.late:
            self.trigger_latency.labels(request.source_id).observe(answer.latency_s)
        if answer.fail_safe and answer.reason == "deadline missed":
            with self._lock:
                self.stats.setdefault(request.source_id, SourceStats()).deadline_missed += 1
        payload = answer.payload()  # a `result` event: the answer's fields (MQTT: `<prefix>/<line>/<source>/result`)
        with self.service.sessions() as session, session.begin():
            add_event(session, RESULT, without_id(payload), event_id=payload["id"],
                      inspection_id=answer.inspection.id if answer.inspection is not None else None)
        self.service.sinks.alerts_committed()  # MQTT and webhooks deliver it from the outbox
        if self.opcua is not None:
            if not answer.late:  # the PLC's answer stays what it was told; the late row still counts
                self.opcua.update(request.source_id, self._row_values(answer.inspection, answer))
            self._publish_counters(request.source_id)

    # --- counters -----------------------------------------------------------------------------------------------

    def _sample(self, name: str, source_id: str) -> float:
        registry = self.metrics.registry
        if name == "errors":
            total = 0.0
            for family in registry.collect():
                if family.name == "anomalyd_frames_failed":
                    total += sum(s.value for s in family.samples
                                 if s.name.endswith("_total") and s.labels.get("source") == source_id)
            return total
        return registry.get_sample_value("anomalyd_frames_rejected_total", {"source": source_id}) or 0.0

    def counters(self, source_id: str) -> dict[str, Any]:
        stats = self.stats.setdefault(source_id, SourceStats())
        with self._lock:
            values = {"Counters.Inspected": stats.inspected, "Counters.OK": stats.ok, "Counters.NG": stats.ng,
                      "Counters.DeadlineMissed": stats.deadline_missed, **stats.processing()}
            baseline = dict(stats.baseline)
        for name in ("rejected", "errors"):
            values[f"Counters.{name.capitalize()}"] = self._sample(name, source_id) - baseline.get(name, 0.0)
        return values

    def _publish_counters(self, source_id: str) -> None:
        if self.opcua is not None:
            self.opcua.update(source_id, self.counters(source_id))

    def reset_counters(self, source_id: str) -> None:
        from adapters.opcua import OpcUaCommandError

        if source_id not in self.stats:
            raise OpcUaCommandError("unknown_source", f"no source {source_id!r}")
        baseline = {name: self._sample(name, source_id) for name in ("rejected", "errors")}
        with self._lock:
            self.stats[source_id] = SourceStats(baseline=baseline)
        log.info("counters of %s reset", source_id)
        self._publish_counters(source_id)

    def _refresh_states(self) -> None:
        """System state per source for OPC UA: Disconnected | Error | Busy | Ready (twice a second)."""
        last: dict[str, str] = {}
        while True:
            try:
                healthy = self.service.pipeline.healthy()[0] if self.service.pipeline is not None else False
                for source in self.service.sources:
                    state = _source_state(source, healthy, self.triggers)
                    if last.get(source.id) != state:
                        last[source.id] = state
                        self.opcua.update(source.id, {"SystemState": state})
                detector = self.service.pipeline.detector if self.service.pipeline is not None else None
                self.opcua.update("", {"ActiveModelVersion": str(getattr(detector, "version", "")),
                                       "SystemState": "Ready" if healthy else "Error"})
            except Exception:
                log.exception("cannot refresh the OPC UA system states")
            if self._stopping.wait(0.5):
                return

    # --- commands -----------------------------------------------------------------------------------------------

    def trigger(self, source_id: str, part_id: Any, channel: str) -> str:
        """Accept a trigger (its id) or raise TriggerError."""
        if self.triggers is None:
            known = {cfg.id for cfg in self.settings.sources}
            error = TriggerError("not_triggered" if source_id in known else "unknown_source",
                                 f"source {source_id!r} is free-running (no trigger configured)"
                                 if source_id in known else f"no source {source_id!r}")
            self.trigger_refused.labels(source_id if source_id in known else "unknown", error.code).inc()
            raise error
        try:
            return self.triggers.request(source_id, part_id, channel).id
        except TriggerError as exc:
            known = source_id in self.stats
            self.trigger_refused.labels(source_id if known else "unknown", exc.code).inc()
            log.warning("trigger for %r via %s refused: %s", source_id, channel, exc.message)
            raise

    def _opcua_trigger(self, source_id: str, part_id: Any) -> str:
        from adapters.opcua import OpcUaCommandError

        try:
            return self.trigger(source_id, part_id, "opcua")
        except TriggerError as exc:
            raise OpcUaCommandError(exc.code, exc.message) from exc

    def activate(self, version: str) -> str:
        """Make `version` the active model (all sources); returns it. Raises ValueError naming the problem."""
        from daemon.learning.versions import activate_version

        row = activate_version(self.service.sessions, version)
        if self.service.models is not None:
            self.service.models.check()
        return row.version

    def _opcua_select_model(self, version: str) -> str:
        from adapters.opcua import OpcUaCommandError
        from daemon.learning.versions import UnknownVersionError

        try:
            return self.activate(version)
        except UnknownVersionError as exc:
            raise OpcUaCommandError("unknown_version", str(exc)) from exc
        except Exception as exc:
            raise OpcUaCommandError("error", str(exc)) from exc

    def _enqueue_command(self, kind: str) -> Any:
        def handle(topic: str, payload: bytes) -> None:  # paho's thread: hand over only
            try:
                self._commands.put_nowait((kind, topic, payload))
            except queue.Full:
                log.warning("MQTT command flood: %s on %s refused (queue of %d full)", kind, topic,
                            COMMAND_QUEUE_SIZE)
                self._reply(kind, topic, {"status": "error", "error": "busy",
                                          "message": "too many commands waiting; try again"})
        return handle

    def _run_commands(self) -> None:
        while not self._stopping.is_set():
            try:
                kind, topic, payload = self._commands.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                reply = self._command(kind, topic, payload)
            except Exception as exc:  # never let one command stop the others
                log.exception("MQTT command %s on %s failed", kind, topic)
                reply = {"status": "error", "error": "error", "message": str(exc)[:300]}
            self._reply(kind, topic, reply)

    def _command(self, kind: str, topic: str, payload: bytes) -> dict[str, Any]:
        if self._verifier is not None:
            from adapters.mqtt_commands import CommandRefused

            try:
                payload = self._verifier.open(topic, payload)
            except CommandRefused as exc:
                log.warning("MQTT command %s on %s refused: %s", kind, topic, exc)
                return {"status": "error", "error": "unauthorized", "message": str(exc)}
        try:
            body = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return {"status": "error", "error": "bad_payload", "message": "the payload must be JSON"}
        if kind == "activate":
            version = body.get("version") if isinstance(body, dict) else body
            if not isinstance(version, str) or not version:
                return {"status": "error", "error": "bad_payload", "message": 'expected {"version": "..."}'}
            try:
                return {"status": "ok", "version": self.activate(version)}
            except ValueError as exc:
                return {"status": "error", "error": "unknown_version", "message": str(exc), "version": version}
        parts = topic.split("/")
        line, source_id = parts[-4], parts[-3]
        part_id = body.get("part_id") if isinstance(body, dict) else body
        configured = {cfg.id: cfg.line for cfg in self.settings.sources}
        if configured.get(source_id, line) != line:
            return {"status": "error", "error": "unknown_source", "part_id": _echo(part_id),
                    "message": f"source {source_id!r} is on line {configured[source_id]!r}, not {line!r}"}
        try:
            trigger_id = self.trigger(source_id, part_id, "mqtt")
        except TriggerError as exc:
            return {**exc.as_dict(), "part_id": _echo(part_id)}
        return {"status": "accepted", "trigger_id": trigger_id, "part_id": str(part_id)}

    def _reply(self, kind: str, topic: str, reply: dict[str, Any]) -> None:
        publisher = self.service.publisher
        if publisher is None:
            return
        status_topic = topic[: -len("/set")] + "/status"
        publisher.publish_reply(status_topic, json.dumps(reply, separators=(",", ":")))

    # --- health, metrics, stop ------------------------------------------------------------------------------------

    def readiness(self, details: dict[str, Any]) -> bool:
        ok = True
        if self.triggers is not None:
            details["triggers"] = {source_id: self.triggers.counts(source_id) for source_id in self.triggers.source_ids}
        return ok

    def _collect(self) -> Iterable[Any]:
        if self.webhooks is not None:
            pending = GaugeMetricFamily("anomalyd_webhook_pending", "Messages waiting for a webhook (at the last scan)",
                                        labels=["webhook"])
            failures = CounterMetricFamily("anomalyd_webhook_failures", "Failed webhook deliveries (retried)",
                                           labels=["webhook"])
            up = GaugeMetricFamily("anomalyd_webhook_up", "1 when the webhook's last attempt succeeded",
                                   labels=["webhook"])
            delivered = CounterMetricFamily("anomalyd_webhook_delivered", "Messages a webhook answered with a 2xx",
                                            labels=["webhook"])
            for name, state in self.webhooks.state.items():
                delivered.add_metric([name], state.delivered)
                pending.add_metric([name], state.pending)
                failures.add_metric([name], state.failures)
                up.add_metric([name], 0.0 if state.consecutive_failures else 1.0)
            yield pending
            yield delivered
            yield failures
            yield up
        if self.triggers is not None:
            missed = CounterMetricFamily("anomalyd_trigger_deadline_missed", "Triggers answered with the fail-safe "
                                         "because the deadline passed", labels=["source"])
            waiting = GaugeMetricFamily("anomalyd_trigger_pending", "Triggers not yet answered", labels=["source"])
            stale = CounterMetricFamily("anomalyd_trigger_stale_frames", "Frames of a triggered source discarded "
                                        "uninspected: captured before the trigger", labels=["source"])
            for source_id in self.triggers.source_ids:
                counts = self.triggers.counts(source_id)
                missed.add_metric([source_id], counts["deadline_missed"])
                waiting.add_metric([source_id], counts["pending"])
                stale.add_metric([source_id], counts["stale_discarded"])
            yield missed
            yield waiting
            yield stale

    def stop_triggers(self) -> None:
        if self.triggers is not None:
            self.triggers.stop()

    def stop(self, deadline: float) -> None:
        """After the pipeline drained: flush the webhooks (bounded), stop the servers and threads."""
        self._stopping.set()
        self.stop_triggers()
        if self._command_thread is not None:
            self._command_thread.join(1.0)


def _source_state(source: Any, pipeline_healthy: bool, triggers: TriggerController | None) -> str:
    status = str(getattr(getattr(source, "status", ""), "value", getattr(source, "status", "")))
    if status != "online":
        return "Disconnected"
    if not pipeline_healthy:
        return "Error"
    if triggers is not None and triggers.is_triggered(source.id) and triggers.pending(source.id):
        return "Busy"
    return "Ready"


def _echo(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)[:200]


def _aware(when: Any) -> Any:
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when
