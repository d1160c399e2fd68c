"""The inspection pipeline: sources → decode pool → DynamicBatcher → model worker → result writers.

    source queues ──(fair round-robin intake)──► decode/preprocess threads ──► DynamicBatcher
        ──► ModelWorker (detector.predict) ──► results queue ──► writer threads:
            map at frame size, regions, artifacts (files first), one DB transaction (inspection + outbox alert),
            per-frame MQTT message, frame.done(True)

Every frame ends in exactly one of: an inspection row (done(True)), a rejected_frames row (done(True)), or
done(False) (left to the source for redelivery: internal error or shutdown before it was processed).
A crashed thread is logged and recorded in `errors` (readiness fails); nothing restarts silently.

Inject any detector with `.name`, `.version`, `.image_size` and `.predict(images, class_names)` returning an
object with `.scores` (B,) and `.maps` (B,S,S) tensors; the daemon builds it with `model.create_detector`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from adapters.db.repository import (
    SavedInspection,
    inspection_by_frame_id,
    inspections_by_frame_ids,
    record_rejected,
    save_inspection,
    save_inspections,
)
from adapters.db.tables import Inspection
from adapters.mqtt import alert_payload, topic
from adapters.sinks import CommittedInspection, SinkSet
from adapters.sources.base import SourceSettings
from adapters.storage import ArtifactStore
from daemon.batcher import DynamicBatcher
from daemon.metrics import Metrics
from daemon.results import extract_regions, map_to_frame
from daemon.worker import DetectorLike, ModelWorker, PreparedFrame, ScoredFrame

log = logging.getLogger(__name__)

_STOP = object()


@dataclass
class PipelineOptions:
    max_batch_size: int = 8
    max_batch_delay_s: float = 0.02
    queue_size: int = 64  # batcher and results queue bound
    decode_threads: int = 2
    persist_threads: int = 1
    persist_batch: int = 32  # results stored per transaction, at most
    min_region_area: int = 1
    mqtt_prefix: str = "anomalyd"  # the outbox rows' topics ([mqtt] prefix and qos)
    alert_qos: int = 1
    reference_preprocessing: bool = False


@dataclass
class _Rendered:
    """A scored frame with its artifacts written and its row's values, waiting for the batch's commit."""

    scored: ScoredFrame
    values: dict[str, Any]
    build_alert: Callable[[Inspection], tuple[str, dict[str, Any], int] | None]
    paths: Any  # adapters.storage.ArtifactPaths
    started: float


class StageTimes:
    """Cumulative seconds per stage (for the bench and logs)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
            self.counts[stage] = self.counts.get(stage, 0) + 1

    def snapshot(self) -> dict[str, tuple[float, int]]:
        with self._lock:
            return {stage: (self.seconds[stage], self.counts[stage]) for stage in self.seconds}


def _default_resize(rgb: np.ndarray, size: int) -> np.ndarray:
    from model.preprocess import fast_resize

    return fast_resize(rgb, size)


def _reference_resize(rgb: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    from model.preprocess import reference_resize

    return reference_resize(Image.fromarray(rgb), size)


class Pipeline:
    """Wires sources to the detector and the result writers. `start()`, then `stop(timeout)` to drain."""

    def __init__(
        self,
        detector: DetectorLike,
        sources: Sequence[Any],
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
        self.sessions = sessions
        self.store = store
        self.sinks = sinks if sinks is not None else SinkSet()
        self.metrics = metrics or Metrics()
        self.on_result = on_result
        self.source_settings = dict(source_settings or {})
        for source in self.sources:
            if source.id not in self.source_settings:
                self.source_settings[source.id] = source.spec
        self.transform = _reference_resize if self.options.reference_preprocessing else _default_resize
        self.stage_times = StageTimes()
        self.errors: list[str] = []
        self.batcher: DynamicBatcher[PreparedFrame] = DynamicBatcher(
            self.options.max_batch_size, self.options.max_batch_delay_s, maxsize=self.options.queue_size)
        self.worker = ModelWorker(detector, self.batcher, self._to_writers, transform=self.transform,
                                  on_failure=self._model_failed, on_batch=self._batch_done)
        self._results: queue.Queue[Any] = queue.Queue(maxsize=self.options.queue_size)
        self._decoders = ThreadPoolExecutor(self.options.decode_threads, thread_name_prefix="decode")
        # Bounds frames between intake and batcher, so back-pressure reaches the source queues.
        self._decode_slots = threading.BoundedSemaphore(self.options.decode_threads * 2)
        self._intake_thread: threading.Thread | None = None
        self._writer_threads: list[threading.Thread] = []
        self._draining = threading.Event()
        self._abort = threading.Event()
        self._started = False
        self.processed = 0
        self.rejected = 0
        self.failed = 0
        self._count_lock = threading.Lock()

    # --- public -------------------------------------------------------------------------------------------------

    @property
    def detector(self) -> DetectorLike:
        return self.worker.detector

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
        for index in range(self.options.persist_threads):
            thread = threading.Thread(target=self._guard(self._write_loop, f"writer-{index}"),
                                      name=f"writer-{index}", daemon=True)
            thread.start()
            self._writer_threads.append(thread)
        self._intake_thread = threading.Thread(target=self._guard(self._intake_loop, "intake"), name="intake",
                                               daemon=True)
        self._intake_thread.start()

    def healthy(self) -> tuple[bool, list[str]]:
        """False with reasons when a pipeline thread crashed or died."""
        problems = list(self.errors)
        if self.worker.crashed is not None:
            problems.append(f"model worker crashed: {self.worker.crashed!r}")
        if self._started and not self._draining.is_set():
            if not self.worker.alive:
                problems.append("model worker is not running")
            if self._intake_thread is not None and not self._intake_thread.is_alive():
                problems.append("intake thread is not running")
            if any(not thread.is_alive() for thread in self._writer_threads):
                problems.append("a writer thread is not running")
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
        drained = True
        if self._intake_thread is not None:
            self._intake_thread.join(max(0.0, deadline - time.monotonic() - min(2.0, timeout / 4)))
            if self._intake_thread.is_alive():
                drained = False
                self._abort.set()
                self._intake_thread.join(1.0)
        self._decoders.shutdown(wait=True)
        self.batcher.close()
        if not self.worker.join(max(0.1, deadline - time.monotonic())):
            drained = False
            log.warning("model worker still busy at the end of the drain")
        for _ in self._writer_threads:
            self._results.put(_STOP)
        for thread in self._writer_threads:
            thread.join(max(0.1, deadline - time.monotonic()))
            if thread.is_alive():
                drained = False
        for source in self.sources:
            for frame in source.queue.drain():
                frame.done(False)
                drained = False
        return drained

    # --- threads ------------------------------------------------------------------------------------------------

    def _guard(self, target: Callable[[], None], name: str) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:
                self.errors.append(f"{name} crashed: {exc!r}")
                log.exception("pipeline thread %s crashed", name)
        return run

    def _intake_loop(self) -> None:
        """Fair round-robin over the source queues."""
        single = len(self.sources) == 1
        while not self._abort.is_set():
            took = False
            for source in self.sources:
                frame = source.queue.get(timeout=0.05 if single else 0)
                if frame is None:
                    continue
                took = True
                self._submit(frame, source)
                if self._abort.is_set():
                    break
            if not took:
                if self._draining.is_set() and all(len(source.queue) == 0 for source in self.sources):
                    return
                if not single:
                    time.sleep(0.002)
        self._update_depth()

    def _submit(self, frame: Any, source: Any) -> None:
        settings = self.source_settings.get(frame.source_id)
        if settings is None:
            # A frame relayed by another host (Redis Streams scale-out) keeps the capture source's id and line;
            # threshold and class come from the source that delivered it.
            via = self.source_settings[source.id]
            settings = via.model_copy(update={"id": str(frame.source_id or via.id),
                                              "line": str(frame.meta.get("line") or via.line)})
        self.metrics.frames_in.labels(settings.id).inc()
        t_in = time.monotonic()
        self._decode_slots.acquire()
        try:
            self._decoders.submit(self._prepare, frame, settings, t_in)
        except RuntimeError:  # executor shut down: give the frame back
            self._decode_slots.release()
            frame.done(False)

    def _prepare(self, frame: Any, settings: SourceSettings, t_in: float) -> None:
        from model.preprocess import ImageDecodeError, decode_image

        try:
            started = time.monotonic()
            try:
                if frame.image is not None:
                    rgb = _as_rgb8(frame.image, frame.name or frame.frame_id)
                elif frame.data is not None:
                    rgb = decode_image(frame.data, name=frame.name or frame.frame_id)
                else:
                    raise ImageDecodeError(str(frame.meta.get("error") or "frame carries no image data"))
            except ImageDecodeError as exc:
                self._reject(frame, settings, str(exc))
                return
            size = int(self.worker.detector.image_size)
            pixels = self.transform(rgb, size)
            decoded = time.monotonic()
            self.stage_times.add("decode", decoded - started)
            self.metrics.decode_latency.observe(decoded - started)
            item = PreparedFrame(frame, settings, rgb, pixels, size, t_in,
                                 timings={"decoded_at": decoded, "intake_wait_s": started - t_in})
            self.batcher.put(item)
            self._update_depth()
        except Exception as exc:
            log.exception("cannot prepare frame %s (%s)", frame.frame_id, frame.name)
            self._fail([frame], settings.id, "decode", exc)
        finally:
            self._decode_slots.release()

    def _to_writers(self, scored: ScoredFrame) -> None:
        self._results.put(scored)
        self._update_depth()

    def _write_loop(self) -> None:
        """Takes what the results queue holds (up to `persist_batch`) and stores it with one transaction."""
        while True:
            item = self._results.get()
            if item is _STOP:
                return
            batch = [item]
            stop_after = False
            while len(batch) < self.options.persist_batch:
                try:
                    more = self._results.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop_after = True
                    break
                batch.append(more)
            try:
                self._write_batch(batch)
            except Exception as exc:  # after-commit trouble (a callback, the broker client): keep writing
                log.exception("cannot finish a batch of %d results", len(batch))
                for scored in batch:
                    if not scored.prepared.frame.finished:
                        self._fail([scored.prepared.frame], scored.prepared.source.id, "persist", exc)
            if stop_after:
                return

    # --- results ------------------------------------------------------------------------------------------------

    def _write_batch(self, batch: list[ScoredFrame]) -> None:
        """Artifacts (files first), then every inspection + alert of the batch in one transaction, then acks.

        If the batch transaction fails, each result is retried in its own, so one bad row (or a frame_id another
        writer just took) cannot hold back the rest; what still fails goes back to its source.
        """
        try:
            with self.sessions() as session:
                known = inspections_by_frame_ids(session, [scored.prepared.frame.frame_id for scored in batch])
        except Exception as exc:
            log.exception("cannot look up %d results in the database", len(batch))
            for scored in batch:
                self._fail([scored.prepared.frame], scored.prepared.source.id, "persist", exc)
            return
        rendered: list[_Rendered] = []
        for scored in batch:
            frame = scored.prepared.frame
            existing = known.get(frame.frame_id)
            if existing is not None:  # redelivered after a commit: ack, no second row or alert
                log.info("frame %s already inspected (#%d); acknowledging", frame.frame_id, existing.id)
                frame.done(True)
                if self.on_result is not None:
                    self.on_result(existing, False)
                continue
            try:
                rendered.append(self._render(scored))
            except Exception as exc:
                log.exception("cannot write the artifacts of frame %s", frame.frame_id)
                self._fail([frame], scored.prepared.source.id, "persist", exc)
        if not rendered:
            return
        t_db = time.monotonic()
        try:
            saved = save_inspections(self.sessions, [(Inspection(**r.values), r.build_alert) for r in rendered])
        except Exception as exc:
            log.warning("storing %d result(s) failed (%s); retrying them one by one", len(rendered),
                        str(exc).splitlines()[0][:200])
            for r in rendered:
                t_single = time.monotonic()
                try:
                    result = save_inspection(self.sessions, Inspection(**r.values), r.build_alert)
                except Exception as single:
                    self._not_saved(r, single)
                    continue
                self._finish(r, result, time.monotonic() - t_single)
            return
        db_share = (time.monotonic() - t_db) / len(rendered)
        for r, result in zip(rendered, saved, strict=True):
            self._finish(r, result, db_share)

    def _render(self, scored: ScoredFrame) -> _Rendered:
        """Map at frame size, regions and artifact files; the row's values (not yet stored)."""
        started = time.monotonic()
        prepared = scored.prepared
        frame, settings = prepared.frame, prepared.source
        rgb = prepared.rgb
        height, width = rgb.shape[:2]
        threshold = float(settings.threshold)
        frame_map = map_to_frame(scored.anomaly_map, width, height)
        mask, regions = extract_regions(frame_map, settings.map_threshold, min_area=self.options.min_region_area)
        key = uuid.uuid4().hex
        captured_at = _utc(frame.captured_at)
        t_post = time.monotonic()
        is_anomalous = bool(scored.score >= threshold)
        paths = self.store.write(key, captured_at, rgb=rgb, anomaly_map=frame_map, mask=mask,
                                 frame_bytes=frame.data, anomalous=is_anomalous)
        t_artifacts = time.monotonic()
        region_dicts = [region.as_dict() for region in regions]
        values = dict(
            uuid=key, frame_id=frame.frame_id, source=settings.id, line=settings.line, frame_name=frame.name or None,
            captured_at=captured_at, processed_at=datetime.now(timezone.utc), model_version=scored.model_version,
            score=float(scored.score), threshold=threshold, is_anomalous=is_anomalous,
            regions=region_dicts, mask_path=paths.mask, heatmap_path=paths.heatmap, frame_path=paths.frame,
            width=width, height=height,
        )

        def build_alert(row: Inspection) -> tuple[str, dict[str, Any], int] | None:
            if not row.is_anomalous:
                return None
            payload = alert_payload(
                inspection_id=row.id, frame_id=row.frame_id, captured_at=captured_at, source=row.source,
                line=row.line, score=row.score or 0.0, threshold=threshold, model_version=row.model_version,
                regions=region_dicts)
            return topic(self.options.mqtt_prefix, row.line, row.source, "anomaly"), payload, self.options.alert_qos

        self.stage_times.add("postprocess", t_post - started)
        self.stage_times.add("artifacts", t_artifacts - t_post)
        return _Rendered(scored, values, build_alert, paths, started)

    def _not_saved(self, r: _Rendered, exc: BaseException) -> None:
        frame = r.scored.prepared.frame
        log.error("cannot store the result of frame %s: %s", frame.frame_id, str(exc).splitlines()[0][:300])
        self.store.delete(r.paths)
        self._fail([frame], r.scored.prepared.source.id, "persist", exc)

    def _finish(self, r: _Rendered, saved: SavedInspection, db_seconds: float) -> None:
        """After the commit: acknowledge the frame, then tell the sinks (new alerts in the outbox, the result)."""
        t_publish = time.monotonic()
        prepared = r.scored.prepared
        frame, settings = prepared.frame, prepared.source
        if not saved.created:
            self.store.delete(r.paths)
        frame.done(True)
        row = saved.inspection
        if saved.created and self.sinks:
            if saved.alert is not None:
                self.sinks.alerts_committed()
            self.sinks.inspection_committed(CommittedInspection(
                inspection_id=row.id, frame_id=row.frame_id, source=row.source, line=row.line,
                captured_at=r.values["captured_at"], score=row.score or 0.0, threshold=row.threshold,
                is_anomalous=row.is_anomalous, model_version=row.model_version, regions=r.values["regions"],
                frame_name=row.frame_name))
        done = time.monotonic()
        self.stage_times.add("database", db_seconds)
        self.stage_times.add("publish", done - t_publish)
        self.stage_times.add("queue", prepared.timings.get("intake_wait_s", 0.0)
                             + max(0.0, prepared.timings.get("scored_at", r.started) - prepared.timings["decoded_at"]
                                   - prepared.timings.get("model_s", 0.0)))
        self.stage_times.add("model", prepared.timings.get("model_s", 0.0))
        self.metrics.persist_latency.observe(done - r.started)
        self.metrics.end_to_end_latency.observe(
            max(0.0, (datetime.now(timezone.utc) - r.values["captured_at"]).total_seconds()))
        self.metrics.inspections.labels(settings.id, "anomalous" if row.is_anomalous else "normal").inc()
        with self._count_lock:
            self.processed += 1
        if self.on_result is not None:
            self.on_result(row, saved.created)

    def _reject(self, frame: Any, settings: SourceSettings, reason: str) -> None:
        with self.sessions() as session:
            existing = inspection_by_frame_id(session, frame.frame_id)
        if existing is not None:  # e.g. a file re-listed after it was inspected and moved: not a bad frame
            log.info("frame %s already inspected (#%d); ignoring the failed re-read: %s",
                     frame.frame_id, existing.id, reason)
            frame.done(True)
            return
        log.warning("rejected frame %s from %s: %s", frame.name or frame.frame_id, settings.id, reason)
        try:
            record_rejected(self.sessions, source=settings.id, frame_id=frame.frame_id, name=frame.name or None,
                            reason=reason)
        except Exception as exc:
            log.exception("cannot record the rejected frame %s", frame.frame_id)
            self._fail([frame], settings.id, "reject", exc)
            return
        self.metrics.frames_rejected.labels(settings.id).inc()
        with self._count_lock:
            self.rejected += 1
        frame.done(True)

    def _model_failed(self, items: list[PreparedFrame], exc: BaseException) -> None:
        for item in items:
            self._fail([item.frame], item.source.id, "model", exc)

    def _fail(self, frames: list[Any], source_id: str, stage: str, exc: BaseException) -> None:
        for frame in frames:
            self.metrics.frames_failed.labels(source_id, stage).inc()
            with self._count_lock:
                self.failed += 1
            frame.done(False)

    def _batch_done(self, size: int, queue_wait: float, inference: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.queue_latency.observe(queue_wait)
        self.metrics.inference_latency.observe(inference)
        self._update_depth()

    def _update_depth(self) -> None:
        self.metrics.queue_depth.labels("batcher").set(len(self.batcher))
        self.metrics.queue_depth.labels("results").set(self._results.qsize())
        for source in self.sources:
            self.metrics.queue_depth.labels(f"source:{source.id}").set(len(source.queue))


def _utc(when: datetime) -> datetime:
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


def _as_rgb8(image: np.ndarray, name: str) -> np.ndarray:
    """An already-decoded frame (cameras, video) as RGB uint8 (H,W,3); gray and RGBA are converted."""
    from model.preprocess import ImageDecodeError

    array = np.asarray(image)
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    if array.dtype != np.uint8:
        raise ImageDecodeError(f"{name}: unsupported pixel type {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return np.ascontiguousarray(np.repeat(array[:, :, None], 3, axis=2))
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return np.ascontiguousarray(array[:, :, :3])
    raise ImageDecodeError(f"{name}: unsupported image shape {array.shape}")
