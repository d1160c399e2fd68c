"""The model worker: one thread per device taking batches from the DynamicBatcher and running the detector.

Items (the pipeline's one `FrameRecord` per frame) arrive decoded and resized (`pixels`, uint8, made off this
thread); the worker stacks them into buffers it reuses, normalises the batch on the model's device, predicts, fills
each record's score, map and model version and hands it to the sink (post-processing runs on other threads, so the
model never waits on disk or database). `swap_detector(new)` takes effect between two batches: no frame is dropped
or scored by a half-swapped model; frames prepared for another input size are re-transformed from their RGB
array.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from daemon.frames.batcher import DynamicBatcher
from daemon.frames.record import FrameRecord

log = logging.getLogger(__name__)


class DetectorLike(Protocol):
    name: str
    version: str
    image_size: int

    def predict(self, images: Any, class_names: list[str] | None = None) -> Any: ...


class ModelWorker:
    """Runs `detector.predict` on batches of `FrameRecord`s; `sink(record)` receives each scored record,
    `on_failure(records, exc)` the records of a batch the model failed on."""

    def __init__(
        self,
        detector: DetectorLike,
        batcher: DynamicBatcher[FrameRecord],
        sink: Callable[[FrameRecord], None],
        *,
        transform: Callable[[np.ndarray, int], np.ndarray],  # (rgb, S) → (S,S,3) uint8, for a new input size
        on_failure: Callable[[list[FrameRecord], BaseException], None] | None = None,
        on_batch: Callable[[int, float, float], None] | None = None,  # (size, queue_wait_s, inference_s)
        name: str = "model-worker",
    ) -> None:
        self.detector = detector
        self.batcher = batcher
        self.sink = sink
        self.transform = transform
        self.on_failure = on_failure
        self.on_batch = on_batch
        self.name = name
        self._pending: tuple[DetectorLike, threading.Event] | None = None
        self._swap_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.crashed: BaseException | None = None
        self.batches = 0
        self.frames = 0
        self.model_seconds = 0.0
        self._buffers: tuple[Any, np.ndarray, Any] | None = None  # (key, uint8 batch, float batch)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def swap_detector(self, detector: DetectorLike) -> threading.Event:
        """Use `detector` from the next batch on; the returned event is set once it is in use."""
        applied = threading.Event()
        with self._swap_lock:
            if self._pending is not None:
                self._pending[1].set()  # superseded: the newer one wins
            self._pending = (detector, applied)
        if not self.alive:
            self._apply_swap()
        return applied

    def _apply_swap(self) -> None:
        with self._swap_lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            old = self.detector
            self.detector = pending[0]
            log.info("model swapped: %s %s -> %s %s", getattr(old, "name", "?"), getattr(old, "version", "?"),
                     getattr(self.detector, "name", "?"), getattr(self.detector, "version", "?"))
            pending[1].set()

    def _run(self) -> None:
        try:
            while True:
                batch = self.batcher.get_batch(timeout=0.2)
                self._apply_swap()
                if not batch:
                    if self.batcher.closed and len(self.batcher) == 0:
                        return
                    continue
                self._process(batch)
        except BaseException as exc:
            self.crashed = exc
            log.exception("%s crashed", self.name)
            raise

    def _model_input(self, pixels: list[np.ndarray], detector: DetectorLike) -> Any:
        """The batch as normalised float input on the detector's device, built in buffers kept across batches:
        allocating a fresh (B,3,S,S) tensor per batch costs more in page faults than the normalisation itself."""
        import torch

        from model.preprocess import normalise_pixels

        device = torch.device(getattr(detector, "device", None) or "cpu")
        count, shape = len(pixels), pixels[0].shape
        key = (device, shape)
        if self._buffers is None or self._buffers[0] != key or self._buffers[1].shape[0] < count:
            capacity = max(count, self.batcher.max_batch_size)
            self._buffers = (key, np.empty((capacity, *shape), np.uint8),
                             torch.empty((capacity, shape[2], shape[0], shape[1]), dtype=torch.float32,
                                         device=device))
        _, staged, images = self._buffers
        np.stack(pixels, out=staged[:count])
        return normalise_pixels(torch.from_numpy(staged[:count]).to(device), out=images[:count])

    def _process(self, batch: list[FrameRecord]) -> None:
        import torch

        detector = self.detector
        size = int(detector.image_size)
        started = time.monotonic()
        queue_wait = started - min(item.timings.get("decoded_at", item.t_in) for item in batch)
        try:
            pixels = [item.pixels if item.size == size else self.transform(item.rgb, size) for item in batch]
            images = self._model_input(pixels, detector)
            names = [item.source.class_name for item in batch]
            routed = getattr(detector, "predict_routed", None)  # per-source references (daemon/references/manager.py)
            versions: list[str] | None = None
            with torch.inference_mode():
                if routed is not None:  # the frames too: sources with a fit/tile/ROI geometry (daemon/config/geometry.py)
                    prediction, versions = routed(images, names if any(names) else None,
                                                  [item.source.id for item in batch],
                                                  frames=[item.rgb for item in batch])
                else:
                    prediction = detector.predict(images, class_names=names if any(names) else None)
            scores = prediction.scores.detach().float().cpu().numpy().reshape(-1)
            notes = getattr(prediction, "notes", None)  # per frame, or None (a NaN score: no decision)
            # a list when sources have a geometry: each map in its frame's pixels (the writer keeps it as it is)
            maps = prediction.maps if isinstance(prediction.maps, list) \
                else prediction.maps.detach().float().cpu().numpy()
            if scores.shape[0] != len(batch) or len(maps) != len(batch):
                raise RuntimeError(f"detector returned {scores.shape[0]} scores / {len(maps)} maps "
                                   f"for a batch of {len(batch)}")
        except Exception as exc:
            log.exception("model failed on a batch of %d frames", len(batch))
            if self.on_failure is not None:
                self.on_failure(batch, exc)
            return
        elapsed = time.monotonic() - started
        self.batches += 1
        self.frames += len(batch)
        self.model_seconds += elapsed
        if self.on_batch is not None:
            self.on_batch(len(batch), queue_wait, elapsed)
        version = str(getattr(detector, "version", "unknown"))
        name = str(getattr(detector, "name", "unknown"))
        for index, item in enumerate(batch):
            item.timings["model_s"] = elapsed / len(batch)
            item.timings["scored_at"] = time.monotonic()
            item.score, item.anomaly_map = float(scores[index]), maps[index]
            item.model_version, item.model_name = versions[index] if versions else version, name
            item.notes = notes[index] if notes is not None and index < len(notes) else None
            self.sink(item)
