"""The result writer: scored `FrameRecord`s → map at frame size, regions, artifact files (first), one database
transaction per batch (inspections + outbox alerts), then `frame.done(True)` and the result sinks.

Results of live and triggered frames (`record.ahead`) are taken from the results queue before a backlog's, so a
camera frame does not wait behind a file backlog here either (see daemon/frames/batcher.py).

Writer threads take what the results queue holds (up to `persist_batch`) and store it in one transaction. If that
fails, each result is retried in its own, so one bad row (or a frame_id another writer just took) cannot hold back
the rest; what still fails goes back to its source. A frame already stored (redelivered after a commit) is
acknowledged without a second row or alert. Rejected frames (undecodable input) are recorded here too.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

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
from adapters.events import INSPECTION, inspection_body
from adapters.mqtt import verdict
from adapters.sinks import CommittedInspection, SinkSet
from adapters.sources.base import Frame, SourceSettings
from adapters.storage import ArtifactPaths, ArtifactStore
from adapters.timeutil import as_utc
from daemon.frames.record import FrameRecord, Outcomes, PipelineOptions, StageTimes
from daemon.frames.results import extract_regions, map_to_frame
from daemon.telemetry.metrics import Metrics
from daemon.zero_label.drift import DriftTracker

log = logging.getLogger("daemon.frames.pipeline")

_STOP = object()

AlertBuilder = Callable[[Inspection], "tuple[str, dict[str, Any]] | None"]


@dataclass
class _Rendered:
    """A scored record with its artifacts written and its row's values, waiting for the batch's commit."""

    record: FrameRecord
    values: dict[str, Any]
    build_alert: AlertBuilder
    paths: ArtifactPaths
    started: float


class ResultsQueue:
    """The bounded queue from the model worker to the writer threads: `ahead` records first, then the others in
    arrival order; the stop marker after everything."""

    def __init__(self, maxsize: int) -> None:
        self._queue: queue.PriorityQueue[tuple[int, int, Any]] = queue.PriorityQueue(maxsize)
        self._order = itertools.count()

    def put(self, item: Any) -> None:
        lane = 2 if item is _STOP else 0 if getattr(item, "ahead", False) else 1
        self._queue.put((lane, next(self._order), item))

    def get(self) -> Any:
        return self._queue.get()[2]

    def get_nowait(self) -> Any:
        return self._queue.get_nowait()[2]

    def qsize(self) -> int:
        return self._queue.qsize()


class ResultWriter:
    """`put(record)` from the model worker; `start()`, then `stop(timeout)` once the worker has finished."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        store: ArtifactStore,
        sinks: SinkSet,
        *,
        options: PipelineOptions,
        outcomes: Outcomes,
        metrics: Metrics,
        stage_times: StageTimes,
        on_result: Callable[[Inspection, bool], None] | None = None,
        guard: Callable[[Callable[[], None], str], Callable[[], None]] = lambda target, _name: target,
    ) -> None:
        self.sessions = sessions
        self.store = store
        self.sinks = sinks
        self.options = options
        self.outcomes = outcomes
        self.metrics = metrics
        self.stage_times = stage_times
        self.on_result = on_result
        self._guard = guard
        self.results = ResultsQueue(options.queue_size)
        # Calibrated (threshold, pixel threshold) per (source id, model version) from per-source references
        # (daemon/references/manager.py); the configured ones otherwise.
        self.thresholds: dict[tuple[str, str], tuple[float, float]] = {}
        self._threads: list[threading.Thread] = []
        self.drift = DriftTracker(sessions, metrics=metrics)  # daemon/zero_label/drift.py

    def start(self) -> None:
        try:
            # drifts a previous run left open are cleared: the windows start again
            if self.sessions is not None and self.drift.recover():
                self.sinks.alerts_committed()
        except Exception:
            log.exception("cannot clear the drifts a previous run left open")
        for index in range(self.options.persist_threads):
            thread = threading.Thread(target=self._guard(self._loop, f"writer-{index}"), name=f"writer-{index}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    @property
    def alive(self) -> bool:
        return all(thread.is_alive() for thread in self._threads)

    def put(self, record: FrameRecord) -> None:
        self.results.put(record)

    def stop(self, deadline: float) -> bool:
        """Write what is queued, then end the threads; True when they ended before `deadline` (monotonic)."""
        for _ in self._threads:
            self.results.put(_STOP)
        finished = True
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
            finished &= not thread.is_alive()
        return finished

    def _loop(self) -> None:
        while True:
            item = self.results.get()
            if item is _STOP:
                return
            batch = [item]
            stop_after = False
            while len(batch) < self.options.persist_batch:
                try:
                    more = self.results.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop_after = True
                    break
                batch.append(more)
            try:
                self._write_batch(batch)
            except Exception as exc:  # after-commit trouble (a callback, a sink): keep writing
                log.exception("cannot finish a batch of %d results", len(batch))
                for record in batch:
                    if not record.frame.finished:
                        self.outcomes.fail([record.frame], record.source.id, "persist", exc)
            if stop_after:
                return

    def _write_batch(self, batch: list[FrameRecord]) -> None:
        """Artifacts (files first), then every inspection + alert of the batch in one transaction, then acks."""
        try:
            with self.sessions() as session:
                known = inspections_by_frame_ids(session, [record.frame.frame_id for record in batch])
        except Exception as exc:
            log.exception("cannot look up %d results in the database", len(batch))
            for record in batch:
                self.outcomes.fail([record.frame], record.source.id, "persist", exc)
            return
        rendered: list[_Rendered] = []
        for record in batch:
            frame = record.frame
            existing = known.get(frame.frame_id)
            if existing is not None and self._conflicting(frame, existing, record.source.id):
                continue
            if existing is not None:  # redelivered after a commit: ack, no second row or alert
                log.info("frame %s already inspected (#%d): a redelivery, acknowledged without a second row",
                         frame.frame_id, existing.id)
                self.metrics.frames_deduplicated.labels(record.source.id).inc()
                frame.done(True)
                if self.on_result is not None:
                    self.on_result(existing, False)
                continue
            try:
                rendered.append(self._render(record))
            except Exception as exc:
                log.exception("cannot write the artifacts of frame %s", frame.frame_id)
                self.outcomes.fail([frame], record.source.id, "persist", exc)
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
            self._publish_drift()
            return
        db_share = (time.monotonic() - t_db) / len(rendered)
        for r, result in zip(rendered, saved, strict=True):
            self._finish(r, result, db_share)
        self._publish_drift()

    def _publish_drift(self) -> None:
        """Drifts the batch started, counted or ended: rows and retained outbox messages (daemon/zero_label/drift.py)."""
        try:
            if self.drift.publish():
                self.sinks.alerts_committed()
        except Exception:
            log.exception("cannot record a drift event")

    def _conflicting(self, frame: Frame, existing: Inspection, source_id: str) -> bool:
        """A frame_id already inspected with DIFFERENT content (a producer reusing ids): recorded as a rejected
        row naming the conflict and acknowledged (True); a plain redelivery (same content, or unknown): False."""
        recorded = (existing.meta or {}).get("content_sha1") if isinstance(existing.meta, dict) else None
        if recorded is None or frame.data is None:
            return False
        digest = hashlib.sha1(frame.data).hexdigest()
        if digest == recorded:
            return False
        reason = (f"frame_id conflict: {frame.frame_id!r} was already inspected (#{existing.id}) with different "
                  f"content (sha1 {recorded[:12]}, now {digest[:12]}); this frame was not inspected")
        log.warning("%s", reason)
        try:
            record_rejected(self.sessions, source=source_id, frame_id=f"{frame.frame_id}#conflict-{digest[:12]}",
                            name=frame.name or None, reason=reason)
        except Exception as exc:
            self.outcomes.fail([frame], source_id, "persist", exc)
            return True
        self.outcomes.was_rejected()
        frame.done(True)
        return True

    def _render(self, record: FrameRecord) -> _Rendered:
        """Map at frame size, regions and artifact files; the row's values (not yet stored)."""
        started = time.monotonic()
        frame, settings = record.frame, record.source
        rgb = record.rgb
        assert rgb is not None and record.anomaly_map is not None  # set by intake and worker
        height, width = rgb.shape[:2]
        threshold, pixel_threshold = self.thresholds.get(
            (settings.id, record.model_version), (float(settings.threshold), settings.map_threshold))
        frame_map = map_to_frame(record.anomaly_map, width, height)
        mask, regions = extract_regions(frame_map, pixel_threshold, min_area=self.options.min_region_area)
        key = uuid.uuid4().hex
        captured_at = as_utc(frame.captured_at)
        t_post = time.monotonic()
        score: float | None = float(record.score) if math.isfinite(record.score) else None
        # No decision (never a pass): no score (mutual scoring's window is filling), or a would-be alert while the
        # source is in drift (daemon/zero_label/drift.py); `is_anomalous` is then NULL and no alert goes out.
        no_decision = None if score is not None else \
            "window filling" if (record.notes or {}).get("decided") is False else "no score"
        in_drift = self.drift.observe(settings.id, settings.line, record.model_version, record.notes, captured_at)
        if score is not None and score >= threshold and in_drift:
            no_decision = "drift"
            self.drift.suppressed(settings.id)
        is_anomalous = None if no_decision else bool(score >= threshold)
        paths = self.store.write(key, captured_at, rgb=rgb, anomaly_map=frame_map, mask=mask,
                                 frame_bytes=frame.data, anomalous=is_anomalous is not False)
        t_artifacts = time.monotonic()
        region_dicts = [region.as_dict() for region in regions]
        values = dict(
            uuid=key, frame_id=frame.frame_id, source=settings.id, line=settings.line,
            frame_name=frame.meta.get("stored_name") or frame.name or None,  # where a folder source moves it
            captured_at=captured_at, processed_at=datetime.now(timezone.utc), model_version=record.model_version,
            score=score, threshold=threshold, is_anomalous=is_anomalous,
            regions=region_dicts, mask_path=paths.mask, heatmap_path=paths.heatmap, frame_path=paths.frame,
            width=width, height=height,
            # the content's hash: a later frame reusing this frame_id with other bytes is a conflict, not a redelivery
            meta={"content_sha1": hashlib.sha1(frame.data).hexdigest()} if frame.data is not None else None,
        )
        if frame.meta.get("trigger_id"):  # a triggered frame: the part it inspected (OPC UA / MQTT answers)
            values["meta"] = {"trigger_id": frame.meta["trigger_id"], "part_id": frame.meta.get("part_id")}
        if no_decision:
            values["meta"] = {**(values["meta"] or {}), "no_decision": no_decision}

        def build_alert(row: Inspection) -> tuple[str, dict[str, Any]] | None:
            """An anomalous frame's outbox event (adapters/events.py): what happened, not how a sink shows it."""
            if not row.is_anomalous:
                return None
            return INSPECTION, inspection_body(
                inspection_id=row.id, frame_id=row.frame_id, captured_at=captured_at, source=row.source,
                line=row.line, score=row.score or 0.0, threshold=threshold, model_version=row.model_version,
                regions=region_dicts, mask_path=paths.mask, heatmap_path=paths.heatmap, frame_path=paths.frame)

        self.stage_times.add("postprocess", t_post - started)
        self.stage_times.add("artifacts", t_artifacts - t_post)
        return _Rendered(record, values, build_alert, paths, started)

    def _not_saved(self, r: _Rendered, exc: BaseException) -> None:
        frame = r.record.frame
        log.error("cannot store the result of frame %s: %s", frame.frame_id, str(exc).splitlines()[0][:300])
        self.store.delete(r.paths)
        self.outcomes.fail([frame], r.record.source.id, "persist", exc)

    def _finish(self, r: _Rendered, saved: SavedInspection, db_seconds: float) -> None:
        """After the commit: acknowledge the frame, then tell the sinks (new alerts in the outbox, the result)."""
        t_publish = time.monotonic()
        record = r.record
        frame, settings = record.frame, record.source
        if not saved.created:
            self.store.delete(r.paths)
        frame.done(True)
        row = saved.inspection
        if saved.created and self.sinks:
            if saved.alert is not None:
                self.sinks.alerts_committed()
            self.sinks.inspection_committed(CommittedInspection(
                inspection_id=row.id, frame_id=row.frame_id, source=row.source, line=row.line,
                captured_at=r.values["captured_at"], score=row.score, threshold=row.threshold,
                is_anomalous=row.is_anomalous, model_version=row.model_version, regions=r.values["regions"],
                frame_name=row.frame_name, processed_at=r.values["processed_at"]))
        done = time.monotonic()
        self.stage_times.add("database", db_seconds)
        self.stage_times.add("publish", done - t_publish)
        self.stage_times.add("queue", record.timings.get("intake_wait_s", 0.0)
                             + max(0.0, record.timings.get("scored_at", r.started) - record.timings["decoded_at"]
                                   - record.timings.get("model_s", 0.0)))
        self.stage_times.add("model", record.timings.get("model_s", 0.0))
        self.metrics.persist_latency.observe(done - r.started)
        self.metrics.end_to_end_latency.observe(
            max(0.0, (datetime.now(timezone.utc) - r.values["captured_at"]).total_seconds()))
        self.metrics.inspections.labels(settings.id, verdict(row.is_anomalous)).inc()
        self.metrics.last_inspected.labels(settings.id).set(time.time())
        self.outcomes.inspected()
        if self.on_result is not None:
            self.on_result(row, saved.created)

    def reject(self, frame: Frame, settings: SourceSettings, reason: str) -> None:
        """A frame that cannot be inspected (undecodable input): a rejected_frames row, then done(True)."""
        with self.sessions() as session:
            existing = inspection_by_frame_id(session, frame.frame_id)
        if existing is not None:  # e.g. a file re-listed after it was inspected and moved: not a bad frame
            log.info("frame %s already inspected (#%d); ignoring the failed re-read: %s",
                     frame.frame_id, existing.id, reason)
            frame.done(True)
            return
        log.warning("rejected frame %s from %s: %s", frame.name or frame.frame_id, settings.id, reason)
        if self.outcomes.triggers is not None:
            self.outcomes.triggers.frame_failed(frame, f"rejected: {reason}")
        try:
            record_rejected(self.sessions, source=settings.id, frame_id=frame.frame_id, name=frame.name or None,
                            reason=reason)
        except Exception as exc:
            log.exception("cannot record the rejected frame %s", frame.frame_id)
            self.outcomes.fail([frame], settings.id, "reject", exc)
            return
        self.metrics.frames_rejected.labels(settings.id).inc()
        self.outcomes.was_rejected()
        frame.done(True)
