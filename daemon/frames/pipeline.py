"""The inspection pipeline: sources → intake threads (take + decode) → DynamicBatcher → model worker → result writers.

    source queues ──► intake threads (fair round-robin; each decodes/preprocesses what it took) ──► DynamicBatcher
        ──► ModelWorker (detector.predict) ──► results queue ──► writer threads:
            map at frame size, regions, artifacts (files first), one DB transaction (inspection + outbox alert),
            frame.done(True), then the result sinks (per-frame MQTT message, alert relay wake-up)

The three jobs live in their own modules and pass one `FrameRecord` per frame (daemon/frames/record.py): `Intake`
(daemon/frames/intake.py), `ModelWorker` (daemon/frames/worker.py) and `ResultWriter` (daemon/frames/writer.py); this class wires them.

Every frame ends in exactly one of: an inspection row (done(True)), a rejected_frames row (done(True)), or
done(False) (left to the source for redelivery: internal error or shutdown before it was processed).
A crashed thread is logged and recorded in `errors` (readiness fails); nothing restarts silently.

Inject any detector with `.name`, `.version`, `.image_size` and `.predict(images, class_names)` returning an
object with `.scores` (B,) and `.maps` (B,S,S) tensors; the daemon builds it with `model.create_detector`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from adapters.db.repository import record_rejected
from adapters.db.tables import Inspection
from adapters.log_repeats import install as install_repeat_filter
from adapters.sinks import SinkSet
from adapters.sources.base import SourceSettings
from adapters.sources.source import FrameSource
from adapters.storage import ArtifactStore
from daemon.frames.batcher import DynamicBatcher
from daemon.frames.budget import ByteBudget
from daemon.frames.dead_letter import DeadLetters
from daemon.frames.intake import Intake, default_resize, reference_resize
from daemon.frames.record import FrameRecord, Outcomes, PipelineOptions, StageTimes
from daemon.frames.worker import DetectorLike, ModelWorker
from daemon.frames.writer import ResultWriter
from daemon.telemetry.health import ResourceFaults
from daemon.telemetry.metrics import Metrics

log = logging.getLogger(__name__)  # also the intake's and the writer's logger
REPEATS = install_repeat_filter(log)  # identical errors (a full disk) logged once a minute, with a count

if TYPE_CHECKING:
    from daemon.plant.trigger import TriggerController

__all__ = ["FrameRecord", "Pipeline", "PipelineOptions", "StageTimes"]


class Pipeline:
    """Wires sources to the detector and the result writers. `start()`, then `stop(timeout)` to drain."""

    def __init__(
        self,
        detector: DetectorLike,
        sources: Sequence[FrameSource],
        sessions: sessionmaker[Session],
        store: ArtifactStore,
        *,
        sinks: SinkSet | None = None,
        source_settings: dict[str, SourceSettings] | None = None,
        options: PipelineOptions | None = None,
        metrics: Metrics | None = None,
        on_result: Callable[[Inspection, bool], None] | None = None,  # (row, created) after commit; tests/bench
    ) -> None:
        self.options = options or PipelineOptions()
        self.sources = list(sources)
        self.metrics = metrics or Metrics()
        self.source_settings = dict(source_settings or {})
        for source in self.sources:
            if source.id not in self.source_settings:
                self.source_settings[source.id] = source.spec
        self.transform = reference_resize if self.options.reference_preprocessing else default_resize
        self.stage_times = StageTimes()
        self.metrics.known_sources.update(self.source_settings)
        dead_letters = DeadLetters(
            self.options.max_attempts,
            lambda frame, source_id, reason: record_rejected(
                sessions, source=source_id, frame_id=frame.frame_id, name=frame.name or None, reason=reason),
            on_dead_letter=lambda source_id: self.metrics.dead_lettered.labels(source_id).inc())
        self.outcomes = Outcomes(self.metrics, dead_letters, faults=ResourceFaults(
            hold_s=self.options.resource_fault_hold_s, max_pause_s=self.options.resource_backoff_s,
            on_fault=lambda resource: self.metrics.resource_faults.labels(resource).inc()))
        self.errors: list[str] = []
        self.batcher: DynamicBatcher[FrameRecord] = DynamicBatcher(
            self.options.max_batch_size, self.options.max_batch_delay_s, maxsize=self.options.queue_size,
            live_share=self.options.live_share)
        self.writer = ResultWriter(sessions, store, sinks if sinks is not None else SinkSet(), options=self.options,
                                   outcomes=self.outcomes, metrics=self.metrics, stage_times=self.stage_times,
                                   on_result=on_result, guard=self._guard)
        self.worker = ModelWorker(detector, self.batcher, self._to_writer, transform=self.transform,
                                  on_failure=self._model_failed, on_batch=self._batch_done)
        self.intake = Intake(self.sources, self.source_settings, self.batcher,
                             input_size=lambda: int(self.worker.detector.image_size), transform=self.transform,
                             reject=self.writer.reject, outcomes=self.outcomes, metrics=self.metrics,
                             stage_times=self.stage_times, decode_threads=self.options.decode_threads,
                             max_pixels=self.options.max_pixels, decode_budget_bytes=self.options.decode_budget_bytes,
                             on_queued=self._update_depth, guard=self._guard)
        self._draining = threading.Event()
        self._started = False

    # --- public -------------------------------------------------------------------------------------------------

    @property
    def detector(self) -> DetectorLike:
        return self.worker.detector

    @property
    def store(self) -> ArtifactStore:
        return self.writer.store

    @property
    def sessions(self) -> sessionmaker[Session]:
        return self.writer.sessions

    @property
    def processed(self) -> int:
        return self.outcomes.processed

    @property
    def rejected(self) -> int:
        return self.outcomes.rejected

    @property
    def failed(self) -> int:
        return self.outcomes.failed

    @property
    def thresholds(self) -> dict[tuple[str, str], tuple[float, float]]:
        """Per-source references (daemon/references/manager.py): calibrated (threshold, pixel threshold) per (source id,
        model version); the result writer uses them instead of the configured ones."""
        return self.writer.thresholds

    @thresholds.setter
    def thresholds(self, thresholds: dict[tuple[str, str], tuple[float, float]]) -> None:
        self.writer.thresholds = thresholds

    @property
    def unavailable(self) -> dict[str, str]:
        """Sources that cannot be inspected now (id → reason): the intake rejects their frames."""
        return self.intake.unavailable

    @unavailable.setter
    def unavailable(self, unavailable: dict[str, str]) -> None:
        self.intake.unavailable = unavailable

    @property
    def triggers(self) -> TriggerController | None:
        """daemon.plant.trigger.TriggerController (set before start): triggered sources' frames are taken only for a
        pending trigger, fresh ones only, and go to the model ahead of the free-running sources."""
        return self.intake.triggers

    @triggers.setter
    def triggers(self, triggers: TriggerController | None) -> None:
        self.intake.triggers = triggers
        self.outcomes.triggers = triggers

    @property
    def dead_letters(self) -> DeadLetters:
        return self.outcomes.dead_letters

    @property
    def decode_budget(self) -> ByteBudget:
        return self.intake.decode_budget

    @property
    def on_result(self) -> Callable[[Inspection, bool], None] | None:
        return self.writer.on_result

    @on_result.setter
    def on_result(self, callback: Callable[[Inspection, bool], None] | None) -> None:
        self.writer.on_result = callback

    def swap_detector(self, detector: DetectorLike) -> threading.Event:
        """Replace the detector between two batches (no frame dropped); the event is set once in use."""
        event = self.worker.swap_detector(detector)
        self.metrics.model_swaps.inc()
        return event

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.worker.start()
        self.writer.start()
        self.intake.start()

    def healthy(self) -> tuple[bool, list[str]]:
        """False with reasons when a pipeline thread crashed or died."""
        problems = list(self.errors)
        if self.worker.crashed is not None:
            problems.append(f"model worker crashed: {self.worker.crashed!r}")
        if self._started and not self._draining.is_set():
            if not self.worker.alive:
                problems.append("model worker is not running")
            problems.extend(self.intake.problems())
            if not self.writer.alive:
                problems.append("a writer thread is not running")
        for problem in (self.outcomes.window.problem(), self.outcomes.faults.problem()):
            if problem is not None:
                problems.append(problem)
        return (not problems, problems)

    def stop(self, timeout: float = 10.0) -> bool:
        """Drain: take what the (already stopped) sources queued, finish the batch in flight, write all results.

        Returns True when everything was drained within `timeout`; otherwise frames still in source queues are
        handed back with done(False) (the source redelivers them) and False is returned.
        """
        if not self._started:
            return True
        deadline = time.monotonic() + timeout
        self._draining.set()
        self.outcomes.stopping.set()
        drained = self.intake.drain(deadline - time.monotonic() - min(2.0, timeout / 4))
        self.batcher.close()
        if not self.worker.join(max(0.1, deadline - time.monotonic())):
            drained = False
            log.warning("model worker still busy at the end of the drain")
        drained &= self.writer.stop(deadline)
        for source in self.sources:
            for frame in source.queue.drain():
                frame.done(False)
                drained = False
        return drained

    # --- wiring -------------------------------------------------------------------------------------------------

    def _guard(self, target: Callable[[], None], name: str) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:
                self.errors.append(f"{name} crashed: {exc!r}")
                log.exception("pipeline thread %s crashed", name)
        return run

    def _to_writer(self, record: FrameRecord) -> None:
        self.writer.put(record)
        self._update_depth()

    def _model_failed(self, records: list[FrameRecord], exc: BaseException) -> None:
        for record in records:
            self.outcomes.fail([record.frame], record.source.id, "model", exc)

    def _batch_done(self, size: int, queue_wait: float, inference: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.queue_latency.observe(queue_wait)
        self.metrics.inference_latency.observe(inference)
        self._update_depth()

    def _update_depth(self) -> None:
        self.metrics.queue_depth.labels("batcher").set(len(self.batcher))
        self.metrics.queue_depth.labels("results").set(self.writer.results.qsize())
        for source in self.sources:
            self.metrics.queue_depth.labels(f"source:{source.id}").set(len(source.queue))
