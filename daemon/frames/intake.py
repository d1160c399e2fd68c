"""Intake and preparation: frames from the source queues (fair round-robin) → decoded → `DynamicBatcher`.

Each frame becomes a `FrameRecord` with its source's post-processing settings, its RGB array and the pixels resized
for the model, made on the intake threads so the model worker never decodes. The frames of free-running sources
(files, queues, streams) are taken and decoded by the same thread: `decode_threads` intake threads share one fair
round-robin cursor over the source queues, each decoding what it takes, so such a frame changes thread once between
its source and the model worker (no dispatcher thread handing it to a decode pool). A frame that cannot be decoded goes to
`reject(frame, settings, reason)` (a rejected row); an internal error hands it back to its source. The number of
frames between intake and batcher is bounded, and so are the decoded bytes in flight (`ByteBudget`, from each
frame's header before decoding), so back-pressure reaches the source queues.

Live sources (queue policy `latest`: cameras, streams) have their own intake thread and decode threads, and the
batcher's live lane (daemon/frames/batcher.py): their freshest frame is taken (`FrameQueue.take_newest`) only when the
lane has room for it, i.e. when it will be in the next batch, and just before that batch is due
(`DynamicBatcher.live_due_in`, less the recent decode time), and goes to the model ahead of a file or queue
backlog, which still gets its share of every batch. So a camera's frames are inspected within about one batch
time of their capture however many files wait, and no backlog frame is dropped: the backlog only waits longer.

Triggered sources (`triggers`, daemon/plant/trigger.py) have their own intake thread: with a trigger waiting, frames
captured before it are stale (acknowledged, not inspected); the first fresh one is tagged with the trigger, decoded
on that thread and goes to the model ahead of everything else. Frames nobody triggered are never inspected.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from adapters.sources.base import Frame, SourceSettings
from adapters.sources.source import FrameSource
from daemon.frames.batcher import DynamicBatcher
from daemon.frames.budget import ByteBudget, frame_peak_bytes, render_bytes
from daemon.frames.record import FrameRecord, Outcomes, StageTimes
from daemon.telemetry.metrics import Metrics

if TYPE_CHECKING:
    from daemon.plant.trigger import TriggerController

log = logging.getLogger("daemon.frames.pipeline")

Transform = Callable[[np.ndarray, int], np.ndarray]  # (rgb, S) → (S,S,3) uint8


def default_resize(rgb: np.ndarray, size: int) -> np.ndarray:
    from model.preprocess import fast_resize

    return fast_resize(rgb, size)


def reference_resize(rgb: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    from model.preprocess import reference_resize as resize

    return resize(Image.fromarray(rgb), size)


class Intake:
    """The intake threads (and the live sources' decoders). `start()`; `drain(timeout)` at shutdown (sources already
    stopped)."""

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
        max_pixels: int | None = None,
        decode_budget_bytes: int = 1 << 30,
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
        self._intake_threads = max(1, int(decode_threads))
        self._turn_lock = threading.Lock()  # the round-robin cursor the intake threads share
        self._next_turn = 0
        self.max_pixels = max_pixels
        self.decode_budget = ByteBudget(decode_budget_bytes)
        self.triggers: TriggerController | None = None  # set before start
        self._threads: list[threading.Thread] = []
        self._trigger_thread: threading.Thread | None = None
        self._live_thread: threading.Thread | None = None
        self._live_decoders: ThreadPoolExecutor | None = None  # made when there are live sources
        self._live_decode_threads = decode_threads
        self._live_decoding = 0  # live frames taken, not yet in the batcher
        self._live_decode_s = 0.01  # recent time from taking a live frame to its place in the batcher
        self._live_lock = threading.Lock()
        self._draining = threading.Event()
        self._abort = threading.Event()
        # Sources that cannot be inspected now (id → reason; daemon/references/manager.py): their frames are rejected.
        self.unavailable: dict[str, str] = {}

    def _is_triggered(self, source: FrameSource) -> bool:
        return self.triggers is not None and self.triggers.is_triggered(source.id)

    def _live_sources(self) -> list[FrameSource]:
        """Free-running sources whose queue keeps the newest frames (`latest`): inspected ahead of backlogs."""
        return [s for s in self.sources if not self._is_triggered(s) and getattr(s.queue, "policy", "all") == "latest"]

    def start(self) -> None:
        live = self._live_sources()
        free_running = [s for s in self.sources if not self._is_triggered(s) and s not in live]
        self._threads = [threading.Thread(target=self._guard(lambda: self._loop(free_running), "intake"),
                                          name=f"intake-{index}", daemon=True)
                         for index in range(self._intake_threads)]
        for thread in self._threads:
            thread.start()
        if live:  # its own thread and decoders: a backlog waiting for the batcher never holds a camera frame back
            self._live_decoders = ThreadPoolExecutor(self._live_decode_threads, thread_name_prefix="live-decode")
            self._live_thread = threading.Thread(target=self._guard(lambda: self._live_loop(live), "live-intake"),
                                                 name="live-intake", daemon=True)
            self.batcher.live_incoming = lambda: self._live_decoding
            self._live_thread.start()
        triggered = [s for s in self.sources if self.triggers is not None and self.triggers.is_triggered(s.id)]
        if triggered:  # its own thread: back-pressure from free-running sources never delays a trigger
            self._trigger_thread = threading.Thread(
                target=self._guard(lambda: self._trigger_loop(triggered), "trigger-intake"),
                name="trigger-intake", daemon=True)
            self._trigger_thread.start()

    def problems(self) -> list[str]:
        problems = []
        dead = [thread.name for thread in self._threads if not thread.is_alive()]
        if dead:
            problems.append(f"intake thread{'s' if len(dead) > 1 else ''} {', '.join(dead)} not running")
        if self._trigger_thread is not None and not self._trigger_thread.is_alive():
            problems.append("trigger intake thread is not running")
        if self._live_thread is not None and not self._live_thread.is_alive():
            problems.append("live intake thread is not running")
        return problems

    def drain(self, timeout: float) -> bool:
        """Take what the (stopped) sources queued and prepare it; True when the intake finished within `timeout`
        (else it is aborted and what is still queued stays in the source queues). The live decoders are shut down
        after its last frame went to the batcher; each intake thread ends once the queues are empty."""
        self._draining.set()
        finished = True
        deadline = time.monotonic() + timeout
        for thread in (*self._threads, self._live_thread):
            if thread is None:
                continue
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                finished = False
                self._abort.set()
                thread.join(1.0)
        if self._trigger_thread is not None:
            self._trigger_thread.join(max(0.0, min(2.0, deadline - time.monotonic())))
        if self._live_decoders is not None:
            self._live_decoders.shutdown(wait=True)
        return finished

    def _take_turn(self, free_running: list[FrameSource]) -> tuple[Frame, FrameSource] | None:
        """The next frame in fair round-robin over the free-running sources' queues (shared by the intake threads:
        each source in turn, starting after the one served last), None when all are empty."""
        with self._turn_lock:
            count = len(free_running)
            for offset in range(count):
                index = (self._next_turn + offset) % count
                frame = free_running[index].queue.get(timeout=0)
                if frame is not None:
                    self._next_turn = (index + 1) % count
                    return frame, free_running[index]
        return None

    def _loop(self, free_running: list[FrameSource]) -> None:
        """One intake thread: take the next frame (fair round-robin, `_take_turn`) and decode it here (the live
        sources have `_live_loop`, the triggered ones `_trigger_loop`)."""
        single = len(free_running) == 1
        while not self._abort.is_set():
            turn = self._take_turn(free_running)
            if turn is None and single:  # one source: wait on its queue rather than poll it
                frame = free_running[0].queue.get(timeout=0.05)
                turn = (frame, free_running[0]) if frame is not None else None
            if turn is not None:
                self._submit(*turn)
                continue
            if self._draining.is_set() and all(len(source.queue) == 0 for source in free_running):
                break
            if not free_running:
                time.sleep(0.05)
            elif not single:
                time.sleep(0.002)
        self.on_queued()

    def _live_loop(self, live: list[FrameSource]) -> None:
        """Live sources, round-robin: each one's newest frame, whenever the batcher's live lane has room for it
        (counting the frames still being decoded), so what is taken goes out in the next batch."""
        single = len(live) == 1
        first = 0  # the pass starts after the last source served: with little room, every camera gets its turn
        while not self._abort.is_set():
            # Just in time: a frame taken now would wait for the batch in progress; take it when that one is
            # about to end, so what the model sees was captured a decode before its batch, not a batch earlier.
            if not self._draining.is_set() \
                    and not self.batcher.wait_live_due(2 * self._live_decode_s + 0.005, timeout=0.05):
                continue
            took = False
            for offset in range(len(live)):
                with self._live_lock:
                    room = self.batcher.live_room() - self._live_decoding
                if room <= 0:
                    self.batcher.wait_handout(0.05)  # the lane is full: wait for the next batch to take it
                    break
                index = (first + offset) % len(live)
                frame = live[index].queue.take_newest(timeout=0.005 if single else 0)
                if frame is None:
                    continue
                took = True
                first = (index + 1) % len(live)
                self._submit(frame, live[index], live=True)
                if self._abort.is_set():
                    break
            if not took:
                if self._draining.is_set() and self._live_decoding == 0 \
                        and all(len(source.queue) == 0 for source in live):
                    return
                time.sleep(0.002)

    def _trigger_loop(self, triggered: list[FrameSource]) -> None:
        """Triggered sources: only a fresh frame for a waiting trigger is inspected, first in line."""
        triggers = self.triggers
        assert triggers is not None
        while not self._abort.is_set() and not self._draining.is_set():
            waiting = [(source, triggers.waiting(source.id)) for source in triggered]
            waiting = [(source, request) for source, request in waiting if request is not None]
            if not waiting:
                triggers.wait_for_request(0.05)
                continue
            for source, request in waiting:
                frame = source.queue.get(timeout=0.005 if len(waiting) == 1 else 0)
                if frame is None:
                    continue
                if not triggers.attach(request, frame):
                    triggers.discarded(source.id, frame, f"captured before trigger {request.id}")
                    frame.done(True)  # stale: not the part the trigger asked about
                    continue
                settings = self.source_settings[source.id]
                self.metrics.frames_in.labels(settings.id).inc()
                self._prepare(frame, settings, time.monotonic(), priority=True)
            if len(waiting) > 1:
                time.sleep(0.001)
        for source in triggered:
            for frame in source.queue.drain():
                triggers.discarded(source.id, frame, "queued with no trigger waiting at shutdown")
                frame.done(True)

    def _submit(self, frame: Frame, source: FrameSource, live: bool = False) -> None:
        settings = self.source_settings.get(frame.source_id)
        if settings is None:
            # A frame relayed by another host (Redis Streams scale-out) keeps the capture source's id and line;
            # threshold and class come from the source that delivered it.
            via = self.source_settings[source.id]
            settings = via.model_copy(update={"id": str(frame.source_id or via.id),
                                              "line": str(frame.meta.get("line") or via.line)})
        self.metrics.frames_in.labels(settings.id).inc()
        if settings.id in self.unavailable:  # no usable reference bank (readiness says why): the frame waits
            frame.done(False)  # in its source (inbox, redelivery) until the bank is built; never given up
            return
        t_in = time.monotonic()
        if live and self._live_decoders is not None:
            with self._live_lock:
                self._live_decoding += 1
            try:
                self._live_decoders.submit(self._prepare, frame, settings, t_in, live=True)
            except RuntimeError:  # executor shut down: give the frame back
                self._live_done_decoding()
                frame.done(False)
            return
        self._prepare(frame, settings, t_in)  # on this intake thread: no hand-off to a decode pool

    def _live_done_decoding(self) -> None:
        with self._live_lock:
            self._live_decoding -= 1

    def _prepare(self, frame: Frame, settings: SourceSettings, t_in: float, priority: bool = False,
                 live: bool = False) -> None:
        from model.preprocess import ImageDecodeError, decode_image, header_size

        in_live_decode = live  # counted in _live_decoding until it is in the batcher's live lane
        try:
            # The frame's peak bytes, from the header (nothing decoded yet); after the decode the hold shrinks to
            # what the frame keeps plus its rendering ahead, held until the frame is done (daemon/frames/budget.py).
            if frame.image is not None:
                height, width = np.asarray(frame.image).shape[:2]
                cost = int(np.asarray(frame.image).nbytes) + render_bytes(width, height)
            elif frame.data is not None:
                declared = header_size(frame.data)
                cost = frame_peak_bytes(frame.data, *declared) if declared is not None else 3 * len(frame.data)
                if self.max_pixels is not None and declared is not None \
                        and declared[0] * declared[1] > self.max_pixels:
                    cost = 0  # refused from the header below, never decoded
            else:
                cost = 0
            hold = self.decode_budget.hold_until_done(
                frame, self.decode_budget.acquire(cost, self._abort, priority=priority or live))
            started = time.monotonic()
            try:
                if frame.image is not None:
                    rgb = as_rgb8(frame.image, frame.name or frame.frame_id)
                elif frame.data is not None:
                    rgb = decode_image(frame.data, name=frame.name or frame.frame_id, max_pixels=self.max_pixels)
                else:
                    raise ImageDecodeError(str(frame.meta.get("error") or "frame carries no image data"))
            except ImageDecodeError as exc:
                self.reject(frame, settings, str(exc))
                return
            size = int(self.input_size())
            pixels = self.transform(rgb, size)
            hold.shrink_to(rgb.nbytes + np.asarray(pixels).nbytes + render_bytes(rgb.shape[1], rgb.shape[0]))
            decoded = time.monotonic()
            self.stage_times.add("decode", decoded - started)
            self.metrics.decode_latency.observe(decoded - started)
            record = FrameRecord(frame, settings, t_in, rgb=rgb, pixels=pixels, size=size,
                                 timings={"decoded_at": decoded, "intake_wait_s": started - t_in},
                                 ahead=priority or live)
            if live:
                with self._live_lock:  # out of decode and into the lane at once: the lane's room stays exact
                    self._live_decoding -= 1
                    in_live_decode = False
                    self.batcher.put(record, live=True)
                self._live_decode_s = 0.8 * self._live_decode_s + 0.2 * (time.monotonic() - t_in)
            else:
                self.batcher.put(record, priority=priority)
            self.on_queued()
        except Exception as exc:
            log.exception("cannot prepare frame %s (%s)", frame.frame_id, frame.name)
            self.outcomes.fail([frame], settings.id, "decode", exc)
        finally:
            if live and in_live_decode:
                self._live_done_decoding()


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
