"""Redis Streams transport for scale-out: `RedisFrameWriter` (capture hosts append frames) and
`RedisStreamSource` (`kind = "redis"`: workers read them in a consumer group).

Stream entry fields: `data` (encoded image bytes), `frame_id`, `source`, `line`, `ts` (RFC 3339 UTC),
`content_type`, plus optional `class_name` and any producer metadata (kept in `Frame.meta["fields"]`).

The consumer reads with XREADGROUP (group created with MKSTREAM from id 0 if missing, so frames appended before
the first worker started are processed), acknowledges (XACK) only in `on_done(True)`, i.e. after the result is
committed, and claims entries that another consumer left pending longer than `claim_idle_ms` (XAUTOCLAIM): a
worker killed mid-batch loses nothing. Entries this consumer holds in its queue are re-claimed by itself every
claim_idle_ms/3 (XCLAIM JUSTID: resets their idle time without a redelivery) so a slow but alive worker is not
robbed. Redelivered entries keep their frame_id (the producer's `frame_id` field, else `"<stream>:<entry id>"`),
so the database keeps one row per frame. `on_done(False)` leaves the entry pending: it is claimed again (by any
consumer) after claim_idle_ms. A broken connection marks the source offline and reconnects with capped
exponential backoff; unacknowledged entries stay pending meanwhile.

Options (or build_source keywords from `[redis]`): `url`, `stream` ("anomalyd:frames"), `group` ("anomalyd"),
`consumer` (default `<hostname>-<pid>`), `claim_idle_ms` (30000), `block_ms` (500), `count` (queue size),
`backoff_initial_s` (0.5), `backoff_max_s` (30).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import cv2
import numpy as np
import redis

from adapters.sources.base import Frame, SourceSettings, SourceStatus
from adapters.sources.registry import SourceContext, register_source_kind
from adapters.sources.settings import RedisSourceSettings
from adapters.sources.source import Backoff, FrameSource
from adapters.timeutil import parse_rfc3339, rfc3339, utc_now

DEFAULT_STREAM = "anomalyd:frames"
DEFAULT_GROUP = "anomalyd"
_KNOWN_FIELDS = {"data", "frame_id", "source", "line", "ts", "content_type", "class_name", "error"}


def _secret(value: Any) -> Any:
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _rfc3339(ts: datetime | str | None) -> str:
    if ts is None:
        ts = utc_now()
    if isinstance(ts, str):
        return ts
    if ts.tzinfo is None:
        raise ValueError(f"timestamp {ts!r} has no timezone; use an aware UTC datetime")
    return rfc3339(ts, "auto")


class RedisFrameWriter:
    """Appends frames to a Redis Stream (the `--role capture` side). `maxlen` caps the stream (approximate trim);
    note that trimming may drop entries no worker has read yet, so size it for the longest worker outage."""

    def __init__(self, url: str, stream: str = DEFAULT_STREAM, maxlen: int | None = None, *,
                 client: redis.Redis | None = None) -> None:
        self.stream = stream
        self.maxlen = maxlen
        self.client = client or redis.Redis.from_url(_secret(url), socket_connect_timeout=5, socket_timeout=10)

    def append(self, data: bytes | None, *, frame_id: str, source: str, line: str = "",
               ts: datetime | str | None = None, content_type: str = "image/jpeg", **extra: Any) -> str:
        """XADD one entry; returns the stream entry id. Extra keyword fields are stored as strings.

        `data=None` with an `error=` field forwards a frame the capture host could not read: the worker records
        it as a rejected frame with that reason instead of it vanishing on the capture host.
        """
        if data is None and not extra.get("error"):
            raise TypeError(f"frame {frame_id}: no data; give encoded image bytes, or an error= reason")
        if data is not None and not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"frame {frame_id}: data must be encoded image bytes, got {type(data).__name__}")
        fields: dict[str, Any] = {"frame_id": frame_id, "source": source, "line": line,
                                  "ts": _rfc3339(ts), "content_type": content_type}
        if data is not None:
            fields["data"] = bytes(data)
        fields.update({k: str(v) for k, v in extra.items() if v is not None})
        entry_id = self.client.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    def append_frame(self, frame: Frame, *, jpeg_quality: int = 95) -> str:
        """Forward a source's frame: encoded bytes as they are, a decoded RGB image as JPEG, an unreadable one as
        its error (the worker records it in `rejected_frames`)."""
        content_type = frame.meta.get("content_type", "application/octet-stream")
        data = frame.data
        extra = {"class_name": frame.meta.get("class_name"), "name": frame.name}
        if data is None and frame.image is None:
            extra["error"] = str(frame.meta.get("error") or "the capture source delivered no image data")
        elif data is None:
            reason = "the encoder refused it"
            try:
                ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR),
                                           [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
            except cv2.error as exc:  # e.g. a 16-bit or odd-shaped camera frame
                ok, reason = False, (str(exc).strip().splitlines() or ["OpenCV error"])[-1]
            if ok:
                data, content_type = encoded.tobytes(), "image/jpeg"
            else:
                extra["error"] = (f"cannot JPEG-encode the captured frame (shape {np.shape(frame.image)}, "
                                  f"{getattr(frame.image, 'dtype', '?')}): {reason}")
        return self.append(data, frame_id=frame.frame_id, source=frame.source_id, line=frame.line,
                           ts=frame.captured_at, content_type=content_type, **extra)

    def close(self) -> None:
        self.client.close()


@register_source_kind("redis", settings=RedisSourceSettings)
class RedisStreamSource(FrameSource):
    spec: RedisSourceSettings

    def __init__(self, spec: RedisSourceSettings, *, redis_url: Any = None, redis_stream: str | None = None,
                 redis_group: str | None = None, consumer_name: str | None = None, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        spec = self.spec
        url = _secret(spec.url or (spec.uri if str(spec.uri).startswith(("redis://", "rediss://", "unix://"))
                                   else None) or redis_url)
        if not url:
            raise ValueError(f"redis source {spec.id!r} needs a Redis url ([redis] url or the source's uri)")
        self.url = str(url)
        self.stream = str(spec.stream or redis_stream or DEFAULT_STREAM)
        self.group = str(spec.group or redis_group or DEFAULT_GROUP)
        self.consumer = str(spec.consumer or consumer_name or default_consumer_name())
        self.claim_idle_ms = spec.claim_idle_ms
        self.block_ms = spec.block_ms
        self.count = spec.count or self.queue.maxsize
        self.max_bytes = spec.max_bytes
        self.backoff = Backoff(spec.backoff_initial_s, spec.backoff_max_s)
        self.client = redis.Redis.from_url(self.url, socket_connect_timeout=5,
                                           socket_timeout=self.block_ms / 1000 + 10)
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()
        self._claim_cursor = "0-0"
        # First re-read what this consumer name was given and never acked (a restart with a configured name).
        self._pending_cursor: str | None = "0"
        self._next_claim = 0.0
        self._next_heartbeat = 0.0

    @classmethod
    def from_context(cls, settings: SourceSettings, context: SourceContext) -> RedisStreamSource:
        return cls(settings, queue_size=context.queue_size, on_status=context.on_status,  # type: ignore[arg-type]
                   redis_url=context.redis_url, redis_stream=context.redis_stream, redis_group=context.redis_group,
                   consumer_name=context.consumer_name)

    # -- entries → frames ------------------------------------------------------------------------------------
    def _make_frame(self, entry_id: str, raw: Mapping[bytes, bytes] | None, delivery: str) -> Frame:
        fields = {k.decode(errors="replace") if isinstance(k, bytes) else str(k): v for k, v in (raw or {}).items()}

        def text(name: str) -> str | None:
            value = fields.get(name)
            return value.decode(errors="replace") if isinstance(value, bytes) else value

        meta = self._base_meta()
        meta.update(stream=self.stream, entry_id=entry_id, via=self.id, delivery=delivery)
        if text("line"):
            meta["line"] = text("line")
        if text("class_name"):
            meta["class_name"] = text("class_name")
        meta["content_type"] = text("content_type") or "application/octet-stream"
        meta["fields"] = {k: text(k) for k in fields if k not in _KNOWN_FIELDS}
        captured_at = utc_now()
        if text("ts"):
            try:
                captured_at = self._checked_capture_time(parse_rfc3339(text("ts")), meta)
            except (ValueError, OverflowError):  # out of datetime's range after the UTC shift: OverflowError
                meta["ts_error"] = f"bad ts {text('ts')!r} in stream entry {entry_id}; using the arrival time"
        data = fields.get("data")
        if data is None:
            meta["error"] = text("error") or f"stream entry {self.stream}/{entry_id} has no 'data' field"
        elif len(data) > self.max_bytes:
            meta["error"] = f"stream entry {self.stream}/{entry_id}: data is {len(data)} bytes, more than " \
                            f"max_bytes = {self.max_bytes}"
            data = None
        frame = Frame(frame_id=text("frame_id") or f"{self.stream}:{entry_id}", source_id=text("source") or self.id,
                      captured_at=captured_at, data=data, name=text("name") or f"{self.stream}/{entry_id}",
                      meta=meta)
        frame.on_done = lambda ok, entry_id=entry_id: self._finish(entry_id, ok)
        return frame

    def _finish(self, entry_id: str, ok: bool) -> None:
        """Runs on the pipeline's thread: XACK once the result is committed, else leave the entry pending."""
        try:
            if ok:
                self.client.xack(self.stream, self.group, entry_id)
        except redis.RedisError as exc:
            # Still pending: it will be claimed and redelivered; the DB dedupes on frame_id.
            self._error(f"XACK {entry_id} failed: {exc}")
        finally:
            with self._lock:
                self._in_flight.discard(entry_id)

    def _emit_entries(self, entries: list, delivery: str) -> bool:
        for entry_id, fields in entries:
            entry_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            with self._lock:
                if entry_id in self._in_flight:
                    continue  # already in our queue (re-claimed by us): no duplicate
                self._in_flight.add(entry_id)
            if not fields:
                # Trimmed from the stream (MAXLEN) before anyone processed it: nothing to process, say so loudly.
                self._error(f"stream entry {self.stream}/{entry_id} was deleted before processing")
            frame = self._contained_frame(
                lambda entry_id=entry_id, fields=fields: self._make_frame(entry_id, fields, delivery),
                frame_id=f"{self.stream}:{entry_id}", name=f"{self.stream}/{entry_id}",
                on_done=lambda ok, entry_id=entry_id: self._finish(entry_id, ok))
            if not self._emit(frame):
                return False
        return True

    # -- redis operations ------------------------------------------------------------------------------------
    def _ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _heartbeat(self) -> None:
        with self._lock:
            ids = list(self._in_flight)
        if ids:
            self.client.xclaim(self.stream, self.group, self.consumer, 0, ids, justid=True)

    def _claim(self) -> bool:
        room = self._room()
        if room <= 0:
            return True
        next_id, claimed, *_ = self.client.xautoclaim(self.stream, self.group, self.consumer, self.claim_idle_ms,
                                                      start_id=self._claim_cursor, count=room)
        self._claim_cursor = next_id.decode() if isinstance(next_id, bytes) else str(next_id)
        if claimed:
            self.log.info("claimed %d entries idle > %d ms from other consumers", len(claimed), self.claim_idle_ms)
        return self._emit_entries(claimed, "claimed")

    def _room(self) -> int:
        if self.queue.policy == "latest":
            return self.count
        return min(self.count, self.queue.maxsize - self.queue.qsize())

    def _read(self) -> bool:
        """One XREADGROUP: first this consumer's own pending entries (walking `_pending_cursor`), then new ones."""
        room = self._room()
        if room <= 0:
            self._stop_event.wait(0.05)
            return True
        own_pending = self._pending_cursor is not None
        start = self._pending_cursor if own_pending else ">"
        response = self.client.xreadgroup(self.group, self.consumer, {self.stream: start}, count=room,
                                          block=None if own_pending else self.block_ms)
        entries = response[0][1] if response else []
        if own_pending:
            last = entries[-1][0] if entries else None
            self._pending_cursor = (last.decode() if isinstance(last, bytes) else last) if last else None
        return self._emit_entries(entries, "pending" if own_pending else "new")

    # -- thread ----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        connected = False
        self._pending_cursor = "0"
        while not self._stop_event.is_set():
            try:
                if not connected:
                    self._ensure_group()
                    connected = True
                    self.backoff.reset()
                    self._set_status(SourceStatus.ONLINE)
                now = time.monotonic()
                if now >= self._next_heartbeat:
                    self._heartbeat()
                    self._next_heartbeat = now + self.claim_idle_ms / 3000
                if now >= self._next_claim:
                    if not self._claim():
                        return
                    # Walk the whole PEL quickly, then wait a fraction of the idle time before the next sweep.
                    sweep_done = self._claim_cursor == "0-0"
                    self._next_claim = now + max(self.claim_idle_ms / 2000, 0.05) if sweep_done else now
                if not self._read():
                    return
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                self._error(f"Redis {self.url_for_logs}: {exc}")
                connected = False
                self._pending_cursor = "0"
                self._set_status(SourceStatus.OFFLINE)
                if self._stop_event.wait(self.backoff.next()):
                    break
                self.counters.incr("reconnects")
            except redis.ResponseError as exc:  # e.g. NOGROUP after the stream was deleted
                self._error(f"Redis {self.url_for_logs}: {exc}")
                connected = False
                if self._stop_event.wait(self.backoff.next()):
                    break

    @property
    def url_for_logs(self) -> str:
        """The URL without a password."""
        kwargs = self.client.connection_pool.connection_kwargs
        return f"{kwargs.get('host', kwargs.get('path', '?'))}:{kwargs.get('port', '')}/{self.stream}"

    def close(self) -> None:
        self.client.close()
