"""`FrameSource`, the thread base class of every source kind, with `max_fps` throttling and capped exponential
backoff. It sits above the kind registry (`adapters.sources.registry`: settings by kind, live or not), which sits
above `adapters.sources.base`; nothing imports back down, so the three form no cycle.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from adapters.log_repeats import install as install_repeat_filter
from adapters.sources.base import Frame, FrameQueue, SourceCounters, SourceSettings, SourceStatus
from adapters.sources.registry import parse_source_settings, queue_policy
from adapters.timeutil import utc_now

if TYPE_CHECKING:

    from adapters.sources.registry import SourceContext

log = logging.getLogger(__name__)


class Throttle:
    """`max_fps` pacing: at most one frame per 1/max_fps seconds (0/None = unlimited). `clock` is injectable."""

    def __init__(self, max_fps: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = 1.0 / max_fps if max_fps else 0.0
        self._clock = clock
        self._next: float | None = None

    def delay(self) -> float:
        """Seconds until the next frame may go out (0 = now)."""
        if self.interval <= 0 or self._next is None:
            return 0.0
        return max(0.0, self._next - self._clock())

    def ready(self) -> bool:
        return self.delay() <= 0.0

    def mark(self) -> None:
        """A frame went out now: the next may go out one interval later (never a catch-up burst)."""
        if self.interval > 0:
            self._next = self._clock() + self.interval


class Backoff:
    """Capped exponential backoff: initial, initial*factor, ... up to `maximum`; `reset()` after a success."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, factor: float = 2.0) -> None:
        if initial <= 0 or maximum < initial or factor < 1:
            raise ValueError(f"bad backoff: initial={initial} maximum={maximum} factor={factor}")
        self.initial, self.maximum, self.factor = initial, maximum, factor
        self.current = 0.0  # the last delay handed out
        self._next = initial

    def next(self) -> float:
        self.current = self._next
        self._next = min(self._next * self.factor, self.maximum)
        return self.current

    def reset(self) -> None:
        self.current = 0.0
        self._next = self.initial


class FrameSource(ABC):
    """A source of frames running in its own thread; frames go into `queue`, which the pipeline reads.

    Subclasses implement `_run()` (loop until `self._stop_event` is set), emitting with `self._emit(frame)`
    and reporting with `self._set_status(...)`.
    """

    def __init__(self, spec: SourceSettings | Mapping[str, Any], *, queue_size: int = 16,
                 on_status: Callable[[FrameSource, SourceStatus], None] | None = None) -> None:
        spec = parse_source_settings(spec)
        self.spec = spec
        self.id = spec.id
        self.kind = spec.kind
        self.line = spec.line
        self.class_name = spec.class_name
        self.threshold = spec.threshold
        self.max_fps = spec.max_fps
        self.counters = SourceCounters()
        self.queue = FrameQueue(queue_size, queue_policy(spec), self.counters)
        self.on_status = on_status
        self.status = SourceStatus.OFFLINE if spec.enabled else SourceStatus.DISABLED
        self.last_error: str | None = None
        self._throttle = Throttle(spec.max_fps)
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self.log = logging.getLogger(f"{type(self).__module__}.{self.id}")
        install_repeat_filter(self.log)  # a source failing the same way on every poll: once a minute, counted
        # Supervisor: unexpected exceptions in `_run` seen so far, and the backoff before each restart.
        self.crashes = 0
        self.restart_initial_s = spec.restart_initial_s
        self.restart_max_s = spec.restart_max_s
        self.max_future_s = spec.max_future_s

    @classmethod
    def from_context(cls, settings: SourceSettings, context: SourceContext) -> FrameSource:
        """Build from the registry (`build_source`); kinds that need daemon-wide defaults override this."""
        return cls(settings, queue_size=context.queue_size, on_status=context.on_status)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        if not self.spec.enabled:
            self._set_status(SourceStatus.DISABLED, force=True)
            return
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop_event.clear()
        self.queue.reopen()
        self._thread = threading.Thread(target=self._thread_main, name=f"source-{self.id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop reading, wait up to `timeout` for the thread; queued frames stay in `queue` for the pipeline."""
        self._stop_event.set()
        self._on_stop()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                self.log.warning("source %s did not stop within %.1fs", self.id, timeout)
        if self.status is not SourceStatus.DISABLED:
            self._set_status(SourceStatus.OFFLINE)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _thread_main(self) -> None:
        """Runs `_run` under a supervisor: an unexpected exception is recorded (counters, `last_error`,
        `crashes`, the log) and `_run` starts again after a capped exponential backoff, so no single input or
        bug stops a source for good. A `_run` that returns (stop requested, end of a video) ends the thread."""
        backoff = Backoff(self.restart_initial_s, max(self.restart_initial_s, self.restart_max_s))
        try:
            while not self._stop_event.is_set():
                try:
                    self._run()
                    return
                except Exception as exc:  # a bug in a source must not vanish silently, nor stop it for good
                    self.counters.incr("errors")
                    self.crashes += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    delay = backoff.next()
                    self.log.exception("source %s crashed (%d so far); restarting in %.1fs", self.id, self.crashes,
                                       delay)
                    if self.status is not SourceStatus.DISABLED:
                        self._set_status(SourceStatus.OFFLINE)
                    if self._stop_event.wait(delay):
                        return
                    self.counters.incr("reconnects")
        finally:
            if self.status is not SourceStatus.DISABLED:
                self._set_status(SourceStatus.OFFLINE)

    @abstractmethod
    def _run(self) -> None: ...

    def _on_stop(self) -> None:  # noqa: B027 - an optional hook, empty by default
        """Hook: unblock whatever `_run` waits on (called from `stop`, before joining)."""

    # -- helpers for subclasses ------------------------------------------------------------------------------
    def _set_status(self, status: SourceStatus, *, force: bool = False) -> None:
        if status is self.status and not force:
            return
        self.status = status
        self.log.info("source %s is %s", self.id, status.value)
        if self.on_status is not None:
            try:
                self.on_status(self, status)
            except Exception:
                self.log.exception("on_status callback failed for source %s", self.id)

    def _error(self, message: str) -> None:
        self.counters.incr("errors")
        self.last_error = message
        self.log.warning("source %s: %s", self.id, message)

    def _base_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"line": self.line, "kind": self.kind}
        if self.class_name is not None:
            meta["class_name"] = self.class_name
        return meta

    def _checked_capture_time(self, captured_at: datetime, meta: dict[str, Any]) -> datetime:
        """A producer's capture time, clamped to now when it lies more than `max_future_s` ahead (a wrong clock
        or a bogus value must not sort first in the history for years); the clamp is noted in `meta`."""
        now = utc_now()
        if (captured_at - now).total_seconds() > self.max_future_s:
            meta["ts_error"] = f"capture time {captured_at.isoformat()} is in the future; using the arrival time"
            self._error(meta["ts_error"])
            return now
        return captured_at

    def _contained_frame(self, build: Callable[[], Frame], *, frame_id: str, name: str,
                         on_done: Callable[[bool], None] | None = None) -> Frame:
        """`build()`, or, when turning the input into a frame raised anything, an error frame for the same
        input (data None, `meta["error"]` naming the exception): the pipeline records it in `rejected_frames` and
        acknowledges it, so one odd input can neither stop the source nor be retried forever."""
        try:
            return build()
        except Exception as exc:
            reason = f"cannot turn {name} into a frame: {type(exc).__name__}: {exc}"
            self._error(reason)
            meta = self._base_meta()
            meta["error"] = reason
            return Frame(frame_id=frame_id, source_id=self.id, captured_at=utc_now(), name=name, meta=meta,
                         on_done=on_done)

    def _wait_throttle(self) -> bool:
        """Sleep until max_fps allows the next frame; False if stopping meanwhile."""
        delay = self._throttle.delay()
        while delay > 0:
            if self._stop_event.wait(delay):
                return False
            delay = self._throttle.delay()
        return not self._stop_event.is_set()

    def _emit(self, frame: Frame, *, throttle: bool = True) -> bool:
        """Queue a frame after waiting for max_fps (unless `throttle=False`: the caller paced it), blocking under
        policy "all" until there is room or the source stops.

        Returns False (after calling `frame.done(False)`) when the source stopped before the frame was queued.
        """
        if throttle and not self._wait_throttle():
            frame.done(False)
            return False
        self._throttle.mark()
        while True:
            if self.queue.put(frame, timeout=0.2):
                self.counters.incr("frames_in")
                return True
            if self._stop_event.is_set() or self.queue.closed:
                frame.done(False)
                return False
