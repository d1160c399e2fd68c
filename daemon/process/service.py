"""The daemon's lifecycle: build and start everything, serve until SIGTERM/SIGINT, drain and shut down.

Start order: database (migrations), artifact store, result sinks (MQTT; asynchronous: an absent broker does not
block), detector, pipeline, sources, HTTP server. Stop order (bounded by `runtime.shutdown_grace_s`): sources
stop reading → the pipeline drains what they queued and finishes the batch in flight → the outbox is flushed
while the broker is reachable → source statuses `offline` and `stopped` on `<prefix>/available` → HTTP server.

Readiness: model loaded, database reachable, every pipeline thread alive; the broker state is reported, not
required (alerts wait in the outbox). Its assembly is daemon/process/readiness.py; the HTTP server's thread is
daemon/api/server.py.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.sinks import SinkContext, SinkSet, build_sinks
from adapters.sources.base import SourceSettings, SourceStatus
from adapters.sources.source import FrameSource
from daemon.api.server import ApiServer
from daemon.config.settings import Settings
from daemon.frames.pipeline import Pipeline, PipelineOptions
from daemon.plant.source_availability import AvailabilityBoard, published_status
from daemon.process.background import BackgroundJobs
from daemon.process.readiness import assess_readiness, source_status
from daemon.telemetry.metrics import Metrics

if TYPE_CHECKING:
    from fastapi import APIRouter

    from adapters.mqtt import MqttPublisher
    from daemon.api.app import AppState
    from daemon.frames.worker import DetectorLike
    from daemon.learning.retraining import Retrainer
    from daemon.learning.versions import ModelWatcher
    from daemon.plant.integrations import Integrations
    from daemon.process.capture import CaptureForwarder
    from daemon.references.manager import ReferenceManager

log = logging.getLogger("anomalyd.service")

ROLES = ("all", "worker", "capture")


def build_detector(settings: Settings) -> DetectorLike:
    """The detector from [model] + [runtime] (imports torch and the model code only here)."""
    from daemon.config.model_options import clip_model_options, reference_model_options
    from daemon.references.manager import NeedsReferences
    from model import create_detector
    from model.factory import needs_references

    m = settings.model
    if needs_references(m.name):  # its detectors are built per source, on each source's references
        options = reference_model_options(settings)
        backbone = Path(str(options.get("backbone", "default"))).stem
        size = int(options.get("image_size", 256))
        return NeedsReferences(m.name, f"{m.name}-{backbone}-s{size}", size)
    settings.check_weights()  # every missing weights file named at once, with its URL and place
    return create_detector(m.name, **clip_model_options(settings, backbone=settings.backbone_file(),
                                                        prompts=settings.prompts_file()))


class Service:
    """The whole daemon in one object (tests run it in-process).

    detector: an already built Detector (tests, bench); or detector_factory(settings) → Detector; default
    `build_detector`. sources: prebuilt FrameSource objects instead of the [[sources]] entries. routers: extra
    FastAPI routers (the operator API).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        detector: DetectorLike | None = None,
        detector_factory: Callable[[Settings], DetectorLike] | None = None,
        role: str = "all",
        sources: Sequence[FrameSource] | None = None,
        routers: Sequence[APIRouter] = (),
        serve_http: bool | None = None,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        self.settings = settings
        self.role = role
        self._detector = detector
        self._detector_factory = detector_factory or build_detector
        self._given_sources = list(sources) if sources is not None else None
        self._routers = list(routers)
        self.serve_http = settings.api.enabled if serve_http is None else serve_http
        self.metrics = Metrics()
        self.engine = None
        self.sessions = None
        self.store = None
        self.sinks = SinkSet()
        self.pipeline: Pipeline | None = None
        self.sources: list[FrameSource] = []
        self.api: ApiServer | None = None
        self.http_port: int | None = None
        self._stop_requested = threading.Event()
        self._stopped = False
        self._capture: CaptureForwarder | None = None  # --role capture
        self._errors: list[str] = []
        self.jobs = BackgroundJobs()  # model watcher, retrainer and schedule, retention
        self.integrations: Integrations | None = None  # triggers, webhooks, OPC UA, commands
        self.references: ReferenceManager | None = None  # per-source references, calibration

    @property
    def models(self) -> ModelWatcher | None:
        return self.jobs.models

    @property
    def retrainer(self) -> Retrainer | None:
        return self.jobs.retrainer

    @property
    def publisher(self) -> MqttPublisher | None:
        """The MQTT transport when the MQTT sink is on (statuses, flush in tests)."""
        from adapters.sinks.mqtt import MqttSink

        sink = self.sinks.get("mqtt")
        return sink.publisher if isinstance(sink, MqttSink) else None

    # --- start --------------------------------------------------------------------------------------------------

    def start(self) -> None:
        from adapters.db import make_engine, make_session_factory, upgrade
        from adapters.storage import ArtifactStore, cleanup_stale_tmp

        s = self.settings
        if self.role != "capture":
            self.engine = make_engine(s.database_url, echo=s.database.echo, pool_size=s.database.pool_size)
            upgrade(self.engine)
            self.sessions = make_session_factory(self.engine)
            self.store = ArtifactStore(s.resolve(s.storage.dir), save_frames=s.storage.save_frames,
                                       artifacts=s.storage.artifacts,
                                       jpeg_quality=s.storage.jpeg_quality)
            cleanup_stale_tmp(self.store.root)
            log.info("database %s ready; artifacts under %s", self.engine.url.render_as_string(hide_password=True),
                     self.store.root)
        if self.sessions is not None:
            self.sinks = SinkSet(build_sinks(s, SinkContext(sessions=self.sessions, base_dir=s.base_dir,
                                                            on_alerts_sent=self.metrics.alerts_published.inc)))
            self.sinks.start()
        self.sources = self._build_sources()
        self.metrics.add_source_collector(lambda: self.sources)
        if self.role == "capture":
            from daemon.process.capture import CaptureForwarder

            self._capture = CaptureForwarder(s, self.metrics, self._stop_requested)
            self._capture.start(self.sources)
        else:
            if self.sessions is None:
                detector = self._detector if self._detector is not None else self._detector_factory(s)
            elif self._detector is not None or self._detector_factory is not build_detector:
                from daemon.learning.versions import (
                    startup_detector,  # a given detector or factory: its own version
                )

                built = self._detector if self._detector is not None else self._detector_factory(s)
                detector = startup_detector(s, self.sessions, built)  # registers it / the active one
            else:  # built once: the configured model registered, then the registry's active version built
                from daemon.learning.versions import start_detector

                detector = start_detector(s, self.sessions, build_detector)
            from adapters.cnn_runtime import choose as choose_cnn_runtime
            from daemon.references.manager import NeedsReferences

            log.info("CNN trunks run on %s on the CPU ([runtime].cnn = %s)", choose_cnn_runtime(s.runtime.cnn),
                     s.runtime.cnn)
            if s.runtime.engine != "torch" and not isinstance(detector, NeedsReferences):
                # ONNX Runtime / OpenVINO: export (parity-checked) and run that; a model built on references
                # only (PatchCore) is exported per source, with its bank (daemon/references/manager.py)
                from daemon.detectors.engines import with_engine

                detector = with_engine(s, detector)
            self._detector = detector
            log.info("model %s version %s (input %d px) loaded", getattr(detector, "name", "?"),
                     getattr(detector, "version", "?"), int(detector.image_size))
            detector = self._route_references(detector)
            self.metrics.add_model_collector(self._current_detector)
            self.pipeline = Pipeline(
                detector, self.sources, self.sessions, self.store, sinks=self.sinks,
                source_settings=self._source_settings(), metrics=self.metrics,
                options=PipelineOptions.from_settings(s),
            )
            if self.references is not None:
                self.pipeline.thresholds = self.references.thresholds
                self.pipeline.unavailable = self.references.unavailable
            from daemon.plant.integrations import Integrations

            self.integrations = Integrations(self)
            self.pipeline.on_result = self.integrations.on_result
            self.integrations.attach(self.pipeline)
            self.pipeline.start()
            if self.references is not None:
                self.references.start(swap=self.pipeline.swap_detector)
            self.jobs.start(s, self.sessions, self.store, current=self._current_detector, swap=self.swap_detector)
            self.integrations.start()
        for source in self.sources:
            # retained from the start: a source that never comes up says offline
            self.sinks.source_status(source.line, source.id, self._published(source, source_status(source)))
            if self.references is not None and source.id not in self.references.unavailable:
                self.metrics.source_ready.labels(source.id).set(1.0)
            source.start()
            if source_status(source) == "disabled":
                self.sinks.source_status(source.line, source.id, "disabled")
        if self.serve_http:
            self._start_http()
        log.info("anomalyd running (role %s, %d sources)", self.role, len(self.sources))

    def _route_references(self, detector: Any) -> Any:
        """Per-source references and the daemon's 0–1 score scale (daemon/references/manager.py, daemon/detectors/scale.py)."""
        from daemon.references.manager import ReferenceManager

        if self.references is None:
            ids = [source.id for source in self.sources] or [cfg.id for cfg in self.settings.sources]
            self.references = ReferenceManager(self.settings, self.sessions, self.store, source_ids=ids)
            self.references.unavailable = AvailabilityBoard(self._on_availability)  # daemon/plant/source_availability.py
            self.references.weights_mismatch_listeners.append(self.jobs.retrain_for_geometry)
            if self.sessions is not None:  # every threshold change, retained, to MQTT and webhooks (outbox)
                from daemon.references.geometry_events import announce_config_changes
                from daemon.references.thresholds import outbox_listener

                announce_config_changes(self.sessions, self.settings, ids)  # an edited [[sources]] geometry

                lines = {cfg.id: cfg.line for cfg in self.settings.sources}
                self.references.listeners.append(outbox_listener(
                    self.sessions, lambda source: lines.get(source, "default"), lambda: self.sinks.alerts_committed()))
        return self.references.route(detector)

    def _source_settings(self) -> dict[str, SourceSettings]:
        default_class = self.settings.model.class_name
        return {cfg.id: cfg if cfg.class_name or not default_class else cfg.model_copy(update={"class_name": default_class})
                for cfg in self.settings.sources}

    def _build_sources(self) -> list[FrameSource]:
        if self._given_sources is not None:
            for source in self._given_sources:
                if self.sinks and getattr(source, "on_status", None) is None:
                    source.on_status = self._on_source_status
            return self._given_sources
        from adapters.sources import SourceContext, build_source

        s = self.settings
        built = []
        for cfg in s.sources:
            if self.role == "capture" and cfg.kind == "redis":
                continue  # capture hosts feed the stream; they do not read it
            context = SourceContext(
                queue_size=cfg.queue_size or s.runtime.queue_size,
                on_status=self._on_source_status if self.sinks else None,
                redis_url=s.redis.url.get_secret_value(), redis_stream=s.redis.stream, redis_group=s.redis.group,
                consumer_name=s.redis.consumer, mqtt_username=s.mqtt.username,
                mqtt_password=s.mqtt.password.get_secret_value() if s.mqtt.password else None,
                recorded_frame_ids=self._recorded_frame_ids if self.sessions is not None else None)
            built.append(build_source(cfg.resolved(s.base_dir), context))
        return built

    def _recorded_frame_ids(self, source_id: str, prefix: str) -> list[str]:
        from adapters.db.repository import recorded_frame_ids

        with self.sessions() as session:
            return recorded_frame_ids(session, source_id, prefix)

    def _on_source_status(self, source: FrameSource, status: SourceStatus) -> None:
        self.sinks.source_status(source.line, source.id, self._published(source, str(getattr(status, "value", status))))

    def _published(self, source: FrameSource, status: str) -> str:
        return published_status(status, source.id, self.references.unavailable if self.references else {})

    def _on_availability(self, source_id: str, cause: str | None) -> None:
        """A source's reference bank became unusable (cause) or usable again (None)."""
        self.metrics.source_ready.labels(source_id).set(0.0 if cause else 1.0)
        for source in self.sources:
            if source.id == source_id and self.sinks:
                self.sinks.source_status(source.line, source.id, self._published(source, source_status(source)))

    def app_state(self) -> AppState:
        """What the HTTP API may use of this daemon."""
        from daemon.api.app import AppState

        return AppState(settings=self.settings, metrics=self.metrics, readiness=self.readiness,
                        sessions=self.sessions, store=self.store, retrainer=self.retrainer, sources=self.sources,
                        references=self.references,
                        current_detector=lambda: self.pipeline.detector if self.pipeline is not None else None)

    def _start_http(self) -> None:
        from daemon.api.app import create_app
        from daemon.api.tokens import bootstrap_admin_token

        host, port = self.settings.api.host_port
        self.api = ApiServer(create_app(self.app_state(), self._routers), host, port)
        self.api.start()
        self.http_port = self.api.port
        log.info("HTTP API on http://%s:%d", host if ":" not in host else f"[{host}]", self.api.port)
        bootstrap_admin_token(self.settings, port=self.api.port)  # no token anywhere: an admin token, logged once

    # --- health -------------------------------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, details) over every part this role runs (daemon/process/readiness.py)."""
        return assess_readiness(
            role=self.role, detector=self._current_detector(), pipeline=self.pipeline, models=self.models,
            references=self.references, engine=self.engine, sessions=self.sessions, store=self.store,
            integrations=self.integrations, sinks=self.sinks, sources=self.sources, metrics=self.metrics,
            http_crashed=self.api is not None and self.api.crashed is not None,
            stopping=self._stop_requested.is_set())

    def _current_detector(self) -> DetectorLike | None:
        detector = self.pipeline.detector if self.pipeline is not None else self._detector
        return getattr(detector, "raw", detector)  # the model itself behind the per-source routing

    def swap_detector(self, detector: DetectorLike) -> threading.Event:
        """Use a new detector from the next batch on (retraining/activation)."""
        if self.pipeline is None:
            raise RuntimeError("no pipeline in this role")
        if self.references is not None:
            detector = self.references.route(detector)
        return self.pipeline.swap_detector(detector)

    # --- stop ---------------------------------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop_requested.set()

    def run(self, install_signals: bool = True) -> int:
        """Start, then block until SIGTERM/SIGINT (or `request_stop()`), then stop. Returns the exit status."""
        if install_signals and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: self._stop_requested.set())
        from daemon.telemetry.systemd import SystemdNotifier

        notifier = SystemdNotifier()  # Type=notify + WatchdogSec under systemd; nothing otherwise
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        notifier.ready(f"inspecting {len(self.sources)} source(s)" if self.role != "capture" else "capturing")
        while not self._stop_requested.wait(1.0):
            _, details = self.readiness()
            problems = (details.get("pipeline") or {}).get("problems")
            if problems and problems != self._errors:
                self._errors = list(problems)
                log.error("pipeline unhealthy: %s", "; ".join(problems))
                notifier.status("unhealthy: " + "; ".join(problems))
            notifier.watchdog(healthy=not problems)
        notifier.stopping()
        log.info("stopping (grace %.0fs)", self.settings.runtime.shutdown_grace_s)
        self.stop()  # frames not drained in time were handed back to their sources: still a clean exit
        return 0

    def stop(self) -> bool:
        """Drain and shut down within runtime.shutdown_grace_s; True when nothing was left behind."""
        if self._stopped:
            return True
        self._stopped = True
        self._stop_requested.set()
        grace = self.settings.runtime.shutdown_grace_s
        deadline = time.monotonic() + grace
        clean = True
        try:
            if self.references is not None:
                self.references.stop()
            self.jobs.stop()
        except Exception:
            log.exception("cannot stop the model watcher / retraining / retention")
        per_source = max(0.5, min(5.0, grace / 4 / max(1, len(self.sources))))
        for source in self.sources:
            try:
                source.stop(timeout=per_source)
            except Exception:
                log.exception("source %s failed to stop", source.id)
        if self._capture is not None:
            self._capture.join(deadline)
        if self.pipeline is not None:
            # Keep a quarter of the grace (at most 5 s) for the outbox flush and the goodbye messages.
            reserve = min(5.0, grace / 4)
            clean &= self.pipeline.stop(max(0.5, deadline - time.monotonic() - reserve))
            log.info("pipeline drained: %d inspected, %d rejected, %d left for redelivery",
                     self.pipeline.processed, self.pipeline.rejected, self.pipeline.failed)
        if self.integrations is not None:
            try:
                self.integrations.stop(deadline - min(3.0, grace / 4))
            except Exception:
                log.exception("cannot stop the triggers / OPC UA server / MQTT commands")
        if self.sinks:
            self.sinks.flush(max(0.2, deadline - time.monotonic() - 1.0))  # each sink logs what is left
            for source in self.sources:
                if source_status(source) != "disabled":
                    self.sinks.source_status(source.line, source.id, "offline")
            self.sinks.stop(timeout=max(0.2, min(2.0, deadline - time.monotonic())))
        if self.api is not None:
            self.api.stop(timeout=max(0.2, min(3.0, deadline - time.monotonic())))
        if self.engine is not None:
            self.engine.dispose()
        log.info("anomalyd stopped")
        return clean

