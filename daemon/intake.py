"""Intake and preparation: frames from the source queues (fair round-robin) → decode pool → `DynamicBatcher`.

Each frame becomes a `FrameRecord` with its source's post-processing settings, its RGB array and the pixels resized
for the model, made on the decode threads so the model worker never decodes. A frame that cannot be decoded goes to
`reject(frame, settings, reason)` (a rejected row); an internal error hands it back to its source. The number of
frames between intake and batcher is bounded, so back-pressure reaches the source queues.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from adapters.sources.base import Frame, FrameSource, SourceSettings
from daemon.batcher import DynamicBatcher
from daemon.metrics import Metrics
from daemon.record import FrameRecord, Outcomes, StageTimes

log = logging.getLogger("daemon.pipeline")

Transform = Callable[[np.ndarray, int], np.ndarray]  # (rgb, S) → (S,S,3) uint8


def default_resize(rgb: np.ndarray, size: int) -> np.ndarray:
    from model.preprocess import fast_resize

    return fast_resize(rgb, size)


def reference_resize(rgb: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    from model.preprocess import reference_resize as resize

    return resize(Image.fromarray(rgb), size)


class Intake:
    """The intake thread and the decode pool. `start()`; `drain(timeout)` at shutdown (sources already stopped)."""

    def __init__(
        self,
        sources: Sequence[FrameSource],
        source_settings: dict[str, SourceSettings],
        batcher: DynamicBatcher[FrameRecord],
        *,
        input_size: Callable[[], int],  # the current detector's input size (it may be swapped)
        transform: Transform,
        reject: Callable[[Frame, SourceSettings, str], None],
        outcomes: Outcomes,
        metrics: Metrics,
        stage_times: StageTimes,
        decode_threads: int = 2,
        on_queued: Callable[[], None] = lambda: None,
        guard: Callable[[Callable[[], None], str], Callable[[], None]] = lambda target, _name: target,
    ) -> None:
        self.sources = list(sources)
        self.source_settings = source_settings
        self.batcher = batcher
        self.input_size = input_size
        self.transform = transform
        self.reject = reject
        self.outcomes = outcomes
        self.metrics = metrics
        self.stage_times = stage_times
        self.on_queued = on_queued
        self._guard = guard
        self._decoders = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode")
        self._decode_slots = threading.BoundedSemaphore(decode_threads * 2)
        self._thread: threading.Thread | None = None
        self._draining = threading.Event()
        self._abort = threading.Event()
        # Sources that cannot be inspected now (id → reason; daemon/references.py): their frames are rejected.
        self.unavailable: dict[str, str] = {}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._guard(self._loop, "intake"), name="intake", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def drain(self, timeout: float) -> bool:
        """Take what the (stopped) sources queued and prepare it; True when the intake finished within `timeout`
        (else it is aborted and what is still queued stays in the source queues). The decode pool is shut down
        after its last frame went to the batcher."""
        self._draining.set()
        finished = True
        if self._thread is not None:
            self._thread.join(max(0.0, timeout))
            if self._thread.is_alive():
                finished = False
                self._abort.set()
                self._thread.join(1.0)
        self._decoders.shutdown(wait=True)
        return finished

    def _loop(self) -> None:
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
        self.on_queued()

    def _submit(self, frame: Frame, source: FrameSource) -> None:
        settings = self.source_settings.get(frame.source_id)
        if settings is None:
            # A frame relayed by another host (Redis Streams scale-out) keeps the capture source's id and line;
            # threshold and class come from the source that delivered it.
            via = self.source_settings[source.id]
            settings = via.model_copy(update={"id": str(frame.source_id or via.id),
                                              "line": str(frame.meta.get("line") or via.line)})
        self.metrics.frames_in.labels(settings.id).inc()
        unavailable = self.unavailable.get(settings.id)
        if unavailable is not None:
            self.reject(frame, settings, unavailable)
            return
        t_in = time.monotonic()
        self._decode_slots.acquire()
        try:
            self._decoders.submit(self._prepare, frame, settings, t_in)
        except RuntimeError:  # executor shut down: give the frame back
            self._decode_slots.release()
            frame.done(False)

    def _prepare(self, frame: Frame, settings: SourceSettings, t_in: float) -> None:
        from model.preprocess import ImageDecodeError, decode_image

        try:
            started = time.monotonic()
            try:
                if frame.image is not None:
                    rgb = as_rgb8(frame.image, frame.name or frame.frame_id)
                elif frame.data is not None:
                    rgb = decode_image(frame.data, name=frame.name or frame.frame_id)
                else:
                    raise ImageDecodeError(str(frame.meta.get("error") or "frame carries no image data"))
            except ImageDecodeError as exc:
                self.reject(frame, settings, str(exc))
                return
            size = int(self.input_size())
            pixels = self.transform(rgb, size)
            decoded = time.monotonic()
            self.stage_times.add("decode", decoded - started)
            self.metrics.decode_latency.observe(decoded - started)
            record = FrameRecord(frame, settings, t_in, rgb=rgb, pixels=pixels, size=size,
                                 timings={"decoded_at": decoded, "intake_wait_s": started - t_in})
            self.batcher.put(record)
            self.on_queued()
        except Exception:
            log.exception("cannot prepare frame %s (%s)", frame.frame_id, frame.name)
            self.outcomes.fail([frame], settings.id, "decode")
        finally:
            self._decode_slots.release()


def as_rgb8(image: np.ndarray, name: str) -> np.ndarray:
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
