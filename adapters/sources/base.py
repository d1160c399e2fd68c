"""Common machinery of the frame sources: the `Frame`, the per-source bounded `FrameQueue`, status and counters,
the `FrameSource` thread base class, `max_fps` throttling and capped exponential backoff.

See the package docstring (`adapters/sources/__init__.py`) for the contract between sources and the pipeline.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapters.timeutil import utc_now

if TYPE_CHECKING:
    import numpy as np  # annotations only: the settings models here must load without numpy

    from adapters.sources.registry import SourceContext

from adapters.log_repeats import install as install_repeat_filter

log = logging.getLogger(__name__)

QueuePolicy = Literal["latest", "all"]
# Default `max_bytes` of file/message sources: an encoded input above it is refused unread (a rejected row).
DEFAULT_MAX_BYTES = 256 * 1024 * 1024


@dataclass
class Frame:
    """One frame on its way from a source to the pipeline.

    Exactly one of `data` (encoded bytes, decoded later off the model thread) and `image` (RGB uint8 HxWx3) is
    normally set. When a source could not even read the input (e.g. a file it has no permission to read) both are
    None and `meta["error"]` says why: the pipeline records a rejected row with that reason.
    """

    frame_id: str
    source_id: str
    captured_at: datetime
    data: bytes | None = None
    image: np.ndarray | None = None
    name: str = ""
    meta: dict = field(default_factory=dict)
    on_done: Callable[[bool], None] | None = None
    _done_called: bool = field(default=False, init=False, repr=False, compare=False)

    @property
    def line(self) -> str:
        return str(self.meta.get("line", ""))

    @property
    def finished(self) -> bool:
        """done() was called."""
        return self._done_called

    def done(self, ok: bool) -> None:
        """Call `on_done(ok)` once (later calls are ignored); a failing callback is logged, never raised.

        ok=True: the result (inspection or rejected row) is committed, the source may acknowledge/move/delete.
        ok=False: not processed; the source leaves the input to be retried/redelivered.
        """
        if self._done_called:
            return
        self._done_called = True
        if self.on_done is None:
            return
        try:
            self.on_done(ok)
        except Exception:
            log.exception("on_done(%s) failed for frame %s (%s)", ok, self.frame_id, self.name)


class SourceStatus(str, Enum):
    ONLINE = "online"
    OFFLINE = "offline"
    DISABLED = "disabled"


class SourceCounters:
    """Thread-safe counters of one source (plain int attributes; `snapshot()` for a consistent dict).

    frames_in: frames put into the source's queue; frames_dropped: frames discarded by the `latest` policy
    (queue full); frames_skipped: live frames read but not emitted because of `max_fps`; errors: read/decode/
    connection errors; reconnects: reconnection attempts after a failure.
    """

    NAMES: tuple[str, ...] = ("frames_in", "frames_dropped", "frames_skipped", "errors", "reconnects")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.frames_in = 0
        self.frames_dropped = 0
        self.frames_skipped = 0
        self.errors = 0
        self.reconnects = 0

    def incr(self, name: str, n: int = 1) -> None:
        if name not in self.NAMES:
            raise AttributeError(f"no counter {name!r}")
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {name: getattr(self, name) for name in self.NAMES}

    def __repr__(self) -> str:
        return f"SourceCounters({self.snapshot()})"


class FrameQueue:
    """A bounded queue of frames, one per source.

    policy "latest": when full, `put` drops the OLDEST queued frame (counted in `dropped` and the counters'
    frames_dropped) and calls its `done(True)` so that e.g. a Redis entry is acknowledged rather than redelivered
    forever. policy "all": never drops; `put` blocks until there is room (back-pressure) or `timeout` passes and
    then returns False (the frame was NOT queued). After `close()`, `put` returns False and `get` drains what is
    left, then returns None.
    """

    def __init__(self, maxsize: int, policy: QueuePolicy = "all", counters: SourceCounters | None = None) -> None:
        if maxsize < 1:
            raise ValueError(f"queue size must be >= 1, got {maxsize}")
        if policy not in ("latest", "all"):
            raise ValueError(f"queue policy must be 'latest' or 'all', got {policy!r}")
        self.maxsize = maxsize
        self.policy: QueuePolicy = policy
        self.counters = counters
        self.dropped = 0
        self._items: collections.deque[Frame] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, frame: Frame, timeout: float | None = None) -> bool:
        dropped: Frame | None = None
        with self._cond:
            if self._closed:
                return False
            if len(self._items) >= self.maxsize:
                if self.policy == "latest":
                    dropped = self._items.popleft()
                    self.dropped += 1
                else:
                    deadline = None if timeout is None else time.monotonic() + timeout
                    while len(self._items) >= self.maxsize and not self._closed:
                        remaining = None if deadline is None else deadline - time.monotonic()
                        if remaining is not None and remaining <= 0:
                            return False
                        self._cond.wait(remaining)
                    if self._closed:
                        return False
            self._items.append(frame)
            self._cond.notify_all()
        if dropped is not None:
            if self.counters is not None:
                self.counters.incr("frames_dropped")
            dropped.done(True)
        return True

    def _wait_for_items(self, timeout: float | None) -> bool:
        """Under `_cond`: wait until a frame is queued; False when the queue closed empty or `timeout` passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._items:
            if self._closed:
                return False
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._cond.wait(remaining)
        return True

    def get(self, timeout: float | None = None) -> Frame | None:
        with self._cond:
            if not self._wait_for_items(timeout):
                return None
            frame = self._items.popleft()
            self._cond.notify_all()
            return frame

    def take_newest(self, timeout: float | None = None) -> Frame | None:
        """Like `get`, but the most recently queued frame (a live camera's freshest view); the older ones still
        queued are superseded by it: dropped as the `latest` policy drops (counted, `done(True)`)."""
        with self._cond:
            if not self._wait_for_items(timeout):
                return None
            frame = self._items.pop()
            superseded = list(self._items)
            self._items.clear()
            self.dropped += len(superseded)
            self._cond.notify_all()
        if superseded and self.counters is not None:
            self.counters.incr("frames_dropped", len(superseded))
        for old in superseded:
            old.done(True)
        return frame

    def drain(self) -> list[Frame]:
        """Remove and return everything queued (e.g. to `done(False)` them at shutdown)."""
        with self._cond:
            items = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return items

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def reopen(self) -> None:
        with self._cond:
            self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def qsize(self) -> int:
        with self._cond:
            return len(self._items)

    __len__ = qsize


_NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"


class SourceSettings(BaseModel):
    """One `[[sources]]` entry: the keys every kind shares. Each kind subclasses it with its own keys (a `Literal`
    `kind` and typed, documented fields) and registers the subclass (`adapters.sources.registry`); the daemon's
    configuration validates each entry against the model its `kind` names, so an unknown key stays an error.

    Kind-specific keys may sit next to the common ones or in an `options` table. `threshold` is the image-score
    threshold, `pixel_threshold` the anomaly-map one (unset: the image threshold; `map_threshold` is the value in
    effect).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, pattern=_NAME_PATTERN)
    kind: str = Field("", description="the registered kind (each kind's subclass makes it a Literal)")
    uri: str = ""
    line: str = Field("default", min_length=1, pattern=_NAME_PATTERN)
    max_fps: float | None = Field(None, ge=0, description="0/None = unlimited")
    policy: QueuePolicy | None = Field(None, description="None: latest for live kinds, all otherwise")
    class_name: str | None = None
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="image score at or above: anomalous")
    pixel_threshold: float | None = Field(None, ge=0.0, le=1.0, description="map threshold; default threshold")
    enabled: bool = True
    queue_size: int | None = Field(None, ge=1, description="default: [runtime].queue_size")
    references: str | None = Field(None, description="folder of known-good frames; default [model].references")
    references_from: Literal["labels"] | None = Field(None, description="labelled-normal frames become references")
    # Frame geometry (model/geometry.py, daemon/geometry.py); None: the [model] value.
    resize: Literal["squash", "fit", "tile"] | None = Field(None, description="default: [model].resize")
    roi: list[int] | None = Field(None, min_length=4, max_length=4, description="[x, y, width, height] in pixels")
    # (not `ignore`: the folder source's `ignore` is its glob patterns)
    ignore_polygons: list[list[list[float]]] | None = Field(None, description="polygons [[x, y], ...] never "
                                                                                "inspected; default: [model]'s")
    tile_overlap: float | None = Field(None, ge=0.0, lt=0.9, description="default: [model].tile_overlap")
    # Trigger mode (daemon/trigger.py): inspect the next fresh frame when a PLC asks (OPC UA method or MQTT
    # command) and answer within deadline_ms, else publish the fail-safe result. None: free-running.
    trigger: Literal["opcua", "mqtt"] | None = None
    deadline_ms: float | None = Field(None, gt=0, le=600_000)
    fail_safe: Literal["NG", "no_decision"] = "NG"
    max_pending_triggers: int = Field(4, ge=1, le=1024)
    # Poison containment (issue 9): a crashed source loop restarts after a capped exponential backoff; a capture
    # time more than max_future_s ahead of the clock is clamped to the arrival time.
    restart_initial_s: float = Field(0.5, gt=0, description="first restart delay after a source loop crashed")
    restart_max_s: float = Field(30.0, gt=0, description="longest restart delay after repeated crashes")
    max_future_s: float = Field(300.0, ge=0, description="capture times further ahead are clamped to arrival")

    @model_validator(mode="after")
    def _deadline_needs_trigger(self) -> SourceSettings:
        if self.trigger is None and self.deadline_ms is not None:
            raise ValueError(f"source {self.id!r}: deadline_ms needs trigger = \"opcua\" or \"mqtt\"")
        return self

    @model_validator(mode="before")
    @classmethod
    def _merge_options(cls, data: Any) -> Any:
        """An `options` table is the same as its keys written next to the common ones (which win)."""
        if isinstance(data, Mapping) and "options" in data:
            data = dict(data)
            options = data.pop("options") or {}
            if not isinstance(options, Mapping):
                raise ValueError("options must be a table")
            data = {**options, **data}
        return data

    @classmethod
    def from_mapping(cls, spec: SourceSettings | Mapping[str, Any] | Any) -> SourceSettings:
        """The registered kind's settings from a mapping (or a model with `model_dump()`); ValueError if bad."""
        from adapters.sources.registry import parse_source_settings

        return parse_source_settings(spec)

    @property
    def map_threshold(self) -> float:
        """The anomaly-map threshold in effect."""
        return self.threshold if self.pixel_threshold is None else self.pixel_threshold

    @property
    def live(self) -> bool:
        from adapters.sources.registry import source_kind

        return source_kind(self.kind).live

    @property
    def effective_policy(self) -> QueuePolicy:
        if self.policy is not None:
            return self.policy
        return "latest" if self.live else "all"

    @property
    def options(self) -> dict[str, Any]:
        """The kind-specific keys this entry sets."""
        common = SourceSettings.model_fields
        return {name: getattr(self, name) for name in self.model_fields_set if name not in common}

    def resolved(self, base_dir: Path) -> SourceSettings:
        """These settings with relative file paths made absolute against the config file's directory."""
        return self

    def source_spec(self, base_dir: Path) -> dict[str, Any]:
        """`resolved(base_dir)` as a plain mapping (what `build_source` also takes)."""
        return self.resolved(base_dir).model_dump()


def resolve_path_uri(settings: SourceSettings, base_dir: Path) -> SourceSettings:
    """For kinds whose uri is a file or folder: a relative uri made absolute against `base_dir`."""
    uri = settings.uri
    if uri and "://" not in uri and not Path(uri).expanduser().is_absolute():
        return settings.model_copy(update={"uri": str(base_dir / uri)})
    return settings


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
        spec = SourceSettings.from_mapping(spec)
        self.spec = spec
        self.id = spec.id
        self.kind = spec.kind
        self.line = spec.line
        self.class_name = spec.class_name
        self.threshold = spec.threshold
        self.max_fps = spec.max_fps
        self.counters = SourceCounters()
        self.queue = FrameQueue(queue_size, spec.effective_policy, self.counters)
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
