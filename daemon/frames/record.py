"""What the pipeline's three jobs share: the one frame record they pass along, their options, stage times and the
frame outcome counts.

    Intake (daemon/frames/intake.py) ──FrameRecord──► ModelWorker (daemon/frames/worker.py) ──FrameRecord──► ResultWriter
    (daemon/frames/writer.py)

The intake fills the record's first block (decoded RGB, pixels resized for the model), the worker its second
(score, map, model version), the writer reads it whole.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from adapters.sources.base import Frame, SourceSettings
from daemon.config.settings import RuntimeConfig
from daemon.frames.dead_letter import DeadLetters, resource_fault
from daemon.telemetry.health import OutcomeWindow, ResourceFaults
from daemon.telemetry.metrics import Metrics

if TYPE_CHECKING:
    from daemon.config.settings import Settings
    from daemon.plant.trigger import TriggerController


_RUNTIME = RuntimeConfig()  # the defaults are the configuration's (never written twice)


@dataclass
class PipelineOptions:
    """The pipeline's settings; the daemon derives them from the configuration (`from_settings`)."""

    max_batch_size: int = _RUNTIME.max_batch_size
    max_batch_delay_s: float = _RUNTIME.max_batch_delay_ms / 1000
    queue_size: int = _RUNTIME.queue_size  # batcher and results queue bound
    decode_threads: int = _RUNTIME.decode_threads
    persist_threads: int = _RUNTIME.persist_threads
    persist_batch: int = 32  # results stored per transaction, at most
    min_region_area: int = 1
    reference_preprocessing: bool = False
    max_attempts: int = _RUNTIME.max_attempts  # a frame failing this many times is dead-lettered (daemon/frames/dead_letter.py)
    # readiness names a resource fault this long after the last frame failed on it
    resource_fault_hold_s: float = _RUNTIME.resource_fault_hold_s
    resource_backoff_s: float = _RUNTIME.resource_backoff_s  # longest pause before a resource-faulted frame returns
    max_pixels: int | None = _RUNTIME.max_pixels  # per frame, from its header, before decoding (None: model default)
    decode_budget_bytes: int = _RUNTIME.decode_budget_mb << 20  # decoded frames in flight (RGB bytes)
    live_share: float = _RUNTIME.live_share  # of each batch, for `latest` live sources while a backlog waits

    @classmethod
    def from_settings(cls, settings: Settings) -> PipelineOptions:
        runtime = settings.runtime
        return cls(
            max_batch_size=runtime.max_batch_size, max_batch_delay_s=runtime.max_batch_delay_ms / 1000,
            queue_size=runtime.queue_size, decode_threads=runtime.decode_threads,
            persist_threads=runtime.persist_threads,
            reference_preprocessing=settings.model.reference_preprocessing, max_pixels=runtime.max_pixels,
            decode_budget_bytes=runtime.decode_budget_mb << 20, max_attempts=runtime.max_attempts,
            live_share=runtime.live_share, resource_backoff_s=runtime.resource_backoff_s,
            resource_fault_hold_s=runtime.resource_fault_hold_s)


@dataclass
class FrameRecord:
    """One frame on its way from intake to the result writer."""

    frame: Frame
    source: SourceSettings  # the post-processing settings (threshold, line, class) of the frame's source
    t_in: float  # monotonic time the pipeline took the frame
    # -- intake: decoded and prepared --
    rgb: np.ndarray | None = None  # RGB uint8 (H,W,3) at the frame's own size
    pixels: np.ndarray | None = None  # RGB uint8 (S,S,3), resized for the model (normalised by the worker)
    size: int = 0  # S the pixels were resized to
    timings: dict[str, float] = field(default_factory=dict)
    ahead: bool = False  # a live or triggered frame: batched and written ahead of a file/queue backlog
    # -- model worker: scored --
    score: float = float("nan")
    anomaly_map: np.ndarray | None = None  # (S,S) float32 in model space, or (H,W) in the frame's (a geometry)
    model_version: str = ""
    model_name: str = ""
    notes: dict[str, Any] | None = None  # what the detector knew beyond the score (mutual: drift watch)


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


class Outcomes:
    """How frames ended: inspected, rejected (a rejected_frames row) or failed (done(False): the source redelivers
    it, or dead-lettered after `max_attempts`). Every frame ends in exactly one of them. `window` keeps the recent
    ones for readiness; `faults` the resource faults being waited out (they never count towards dead-lettering
    nor fill the window); `triggers` (daemon.plant.trigger.TriggerController, when set) is told about failed frames so a
    trigger gets its fail-safe answer. `stopping` (set at shutdown) cuts a resource-fault pause short."""

    def __init__(self, metrics: Metrics, dead_letters: DeadLetters, window: OutcomeWindow | None = None,
                 faults: ResourceFaults | None = None) -> None:
        self.metrics = metrics
        self.dead_letters = dead_letters
        self.window = window or OutcomeWindow()
        self.faults = faults or ResourceFaults(
            on_fault=lambda resource: metrics.resource_faults.labels(resource).inc())
        self.triggers: TriggerController | None = None
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self.processed = 0
        self.rejected = 0
        self.failed = 0

    def inspected(self) -> None:
        self.window.add(True)
        self.faults.recovered()
        with self._lock:
            self.processed += 1

    def was_rejected(self) -> None:
        self.window.add(True)
        self.faults.recovered()
        with self._lock:
            self.rejected += 1

    def fail(self, frames: list[Frame], source_id: str, stage: str, exc: BaseException) -> None:
        """Hand the frames back to their source (done(False)) or dead-letter them, counted per stage. A resource
        fault pauses (backoff) before handing back and never dead-letters."""
        resource = resource_fault(exc)
        for frame in frames:
            if self.triggers is not None:
                self.triggers.frame_failed(frame, f"{stage} failed: {exc}")
            self.metrics.frames_failed.labels(source_id, stage).inc()
            with self._lock:
                self.failed += 1
            if resource is not None:
                self.stopping.wait(self.faults.fault(resource, stage, exc))
                frame.done(False)
                continue
            self.window.add(False)
            if not self.dead_letters.failed(frame, source_id, stage, exc):
                frame.done(False)
