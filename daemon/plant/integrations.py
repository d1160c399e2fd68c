"""Factory integration around the pipeline: trigger mode, the OPC UA methods, counters and states, MQTT commands.

One object the service creates and calls at a few points (attach before the pipeline starts, start, each committed
result, readiness, stop), so the wiring stays out of `daemon/process/service.py`. It sees the service only through
`ServiceParts`, the few parts it needs:

- `TriggerController` (daemon/plant/trigger.py) for `[[sources]]` with `trigger = "opcua" | "mqtt"`; each answer (the
  real result, the fail-safe on a deadline miss, a late result) becomes an `outbox` row on
  `<prefix>/<line>/<source>/result` and the sinks are told (`alerts_committed`): the MQTT and webhook sinks
  deliver it with the outbox's guarantee, and the OPC UA sink shows it (its `LastResult`, `DeadlineMissed`) from
  the outbox too, with its own cursor (adapters/sinks/opcua.py).
- The webhook and OPC UA sinks are result sinks (adapters/sinks/webhook.py, adapters/sinks/opcua.py) built by the
  service with the others; here the OPC UA methods are bound to the daemon, its rejected/failed frame counters
  kept (daemon/plant/counters.py) and its system states refreshed.
- MQTT commands (`[mqtt].commands`): daemon/plant/mqtt_commands.py.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from daemon.plant.counters import PlantCounters
from daemon.plant.mqtt_commands import MqttCommands
from daemon.plant.trigger import TriggerAnswer, TriggerController, TriggerError, TriggerSettings
from daemon.telemetry.metrics import LATENCY_BUCKETS, Metrics, _CallbackCollector

log = logging.getLogger("anomalyd.integrations")



class ServiceParts(Protocol):
    """What `Integrations` uses of the service (daemon.process.service.Service)."""

    settings: Any  # daemon.config.settings.Settings
    metrics: Metrics
    sinks: Any  # adapters.sinks.SinkSet
    sessions: Any  # SQLAlchemy sessionmaker, None on a capture host
    pipeline: Any  # daemon.frames.pipeline.Pipeline, once built
    sources: Sequence[Any]  # adapters.sources.FrameSource
    models: Any  # daemon.learning.versions.ModelWatcher, once started

    @property
    def publisher(self) -> Any: ...  # adapters.mqtt.MqttPublisher when the MQTT sink is on


class Integrations:
    """Triggers, OPC UA and MQTT commands of one service."""

    def __init__(self, service: ServiceParts) -> None:
        self.service = service
        self.settings = service.settings
        self.metrics = service.metrics
        self.triggers: TriggerController | None = None
        self.counters = PlantCounters([cfg.id for cfg in self.settings.sources], service.metrics.registry)
        self.commands: MqttCommands | None = None
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
            self.commands = MqttCommands(s, publisher, trigger=self.trigger, activate=self.activate)
            self.commands.start()
        if self.opcua is not None:
            self._status_thread = threading.Thread(target=self._refresh_states, name="opcua-states", daemon=True)
            self._status_thread.start()

    # --- committed results ----------------------------------------------------------------------------------------

    def on_result(self, row: Any, created: bool) -> None:
        """A committed inspection (writer thread): the trigger answers (the OPC UA sink counts it itself)."""
        if self.triggers is not None:
            self.triggers.committed(row)

    def _answer(self, answer: TriggerAnswer) -> None:
        """A trigger's answer: an outbox row (MQTT, webhooks and OPC UA show it from there), metrics."""
        from adapters.db.outbox import add_event
        from adapters.events import RESULT, without_id

        request = answer.request
        kind = "late" if answer.late else "fail_safe" if answer.fail_safe else "result"
        self.trigger_answers.labels(request.source_id, answer.result, kind).inc()
        if not answer.late:
            self.trigger_latency.labels(request.source_id).observe(answer.latency_s)
        payload = answer.payload()  # a `result` event: the answer's fields (MQTT: `<prefix>/<line>/<source>/result`)
        with self.service.sessions() as session, session.begin():
            add_event(session, RESULT, without_id(payload), event_id=payload["id"],
                      inspection_id=answer.inspection.id if answer.inspection is not None else None)
        self.service.sinks.alerts_committed()  # every sink takes it from the outbox, after its cursor

    # --- counters -----------------------------------------------------------------------------------------------

    def _publish_counters(self, source_id: str) -> None:
        if self.opcua is not None:
            self.opcua.update(source_id, self.counters.values(source_id))

    def reset_counters(self, source_id: str) -> None:
        """`ResetCounters`: the sink's counters (stored: a restart keeps the reset) and the rejected/failed ones."""
        from adapters.opcua import OpcUaCommandError

        sink = self.service.sinks.get("opcua")
        try:
            known = sink.reset_counters(source_id) if sink is not None else source_id in self.counters.baselines
        except Exception as exc:  # the database is unreachable: nothing was reset
            raise OpcUaCommandError("error", f"cannot reset the counters of {source_id!r}: {exc}") from exc
        if not known or not self.counters.reset(source_id):
            raise OpcUaCommandError("unknown_source", f"no source {source_id!r}")
        log.info("counters of %s reset", source_id)
        self._publish_counters(source_id)

    def _refresh_states(self) -> None:
        """System state per source for OPC UA: Disconnected | Error | Busy | Ready (twice a second)."""
        last: dict[str, str] = {}
        shown_counts: dict[str, dict[str, Any]] = {}
        while True:
            try:
                healthy = self.service.pipeline.healthy()[0] if self.service.pipeline is not None else False
                for source in self.service.sources:
                    counts = self.counters.values(source.id)  # rejected and failed frames: metrics, not commits
                    if shown_counts.get(source.id) != counts:
                        shown_counts[source.id] = counts
                        self.opcua.update(source.id, counts)
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
            known = source_id in self.counters.baselines
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
        if self.commands is not None:
            self.commands.stop()


def _source_state(source: Any, pipeline_healthy: bool, triggers: TriggerController | None) -> str:
    status = str(getattr(getattr(source, "status", ""), "value", getattr(source, "status", "")))
    if status != "online":
        return "Disconnected"
    if not pipeline_healthy:
        return "Error"
    if triggers is not None and triggers.is_triggered(source.id) and triggers.pending(source.id):
        return "Busy"
    return "Ready"
