"""What the frame sources and the pipeline share: the `Frame`, the per-source bounded `FrameQueue`, status and
counters, and `SourceSettings` (the keys of a `[[sources]]` entry every kind shares). The thread base class
`FrameSource` is in `adapters.sources.source`: it builds on the kind registry, which builds on this module.

See the package docstring (`adapters/sources/__init__.py`) for the contract between sources and the pipeline.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    import numpy as np  # annotations only: the settings models here must load without numpy



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
    # Frame geometry (model/geometry.py, daemon/config/geometry.py); None: the [model] value.
    resize: Literal["squash", "fit", "tile", "auto"] | None = Field(None, description="default: [model].resize")
    roi: list[int] | None = Field(None, min_length=4, max_length=4, description="[x, y, width, height] in pixels")
    # (not `ignore`: the folder source's `ignore` is its glob patterns)
    ignore_polygons: list[list[list[float]]] | None = Field(None, description="polygons [[x, y], ...] never "
                                                                                "inspected; default: [model]'s")
    tile_overlap: float | None = Field(None, ge=0.0, lt=0.9, description="default: [model].tile_overlap")
    tile_size: int | None = Field(None, ge=32, le=16384, description="frame pixels per tile; default: [model]'s")
    # Trigger mode (daemon/plant/trigger.py): inspect the next fresh frame when a PLC asks (OPC UA method or MQTT
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

    @property
    def map_threshold(self) -> float:
        """The anomaly-map threshold in effect."""
        return self.threshold if self.pixel_threshold is None else self.pixel_threshold

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
