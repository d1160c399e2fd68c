"""OpenCV capture sources: `camera` (device index or /dev/video*), `rtsp` / `http` streams and `video` files.

A grabber thread reads frames (BGR → RGB) and emits them. Live streams (camera/rtsp/http, policy `latest`) are
read continuously so the stream's buffer never lags; frames beyond `max_fps` are grabbed but not decoded
(counted as frames_skipped), and the queue keeps the freshest. Video files (policy `all`) emit every frame in
order; at the end the source goes offline and `finished` is set, or starts over with `loop = true`.

Robustness: open/read timeouts are passed to the backend (CAP_PROP_OPEN_TIMEOUT_MSEC / CAP_PROP_READ_TIMEOUT_MSEC,
honoured by FFmpeg), and a watchdog in the source thread abandons a grabber that made no progress for
`watchdog_s` (a backend call that hangs despite the timeouts): the stuck thread is left to die on its own and a
fresh one is started. Failures mark the source offline and reconnect with capped exponential backoff
(counters.reconnects).

frame_id: `"<source>:<uuid4>"` for live frames, `"<source>:<file name>:<frame index>"` for files (with
`#<pass>` after the name for passes after the first when looping), so a replayed file dedupes in the DB. On
start, a video file resumes after the last of its frame ids the database already holds (the daemon's
`SourceContext.recorded_frame_ids`), so a restart does not infer the file again.

Options: `loop` (false), `open_timeout_ms` (10000), `read_timeout_ms` (5000), `watchdog_s` (derived from the
timeouts), `backoff_initial_s` (0.5), `backoff_max_s` (30), `width`/`height`/`fps` (camera settings),
`backend` (an OpenCV API name such as "FFMPEG" or "V4L2").

OpenCV's and FFmpeg's own stderr messages are silenced (set OPENCV_LOG_LEVEL=WARNING or OPENCV_FFMPEG_LOGLEVEL=24
to see them again); open/read failures are reported by the source (log, `last_error`, offline status), with any
password in the uri masked.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from adapters.sources.base import Frame, SourceStatus
from adapters.sources.registry import SourceContext, register_source_kind
from adapters.sources.settings import CaptureSettings
from adapters.sources.source import Backoff, FrameSource, Throttle
from adapters.timeutil import utc_now

# OpenCV and FFmpeg print their own messages straight to stderr (`[ WARN:0@0.02] global cap.cpp:212 open ...`,
# `[tcp @ 0x...] Connection ... failed`), unformatted and without the source's id. Silence both (unless the
# operator asked for them: OPENCV_LOG_LEVEL / OPENCV_FFMPEG_LOGLEVEL, read when a capture first uses FFmpeg); the
# source reports each open/read failure itself, in its log, `last_error` and status (see `_open`).
if "OPENCV_LOG_LEVEL" not in os.environ:
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET


def display_uri(uri: str) -> str:
    """The uri without its password or query (rtsp://user:secret@host/live?token=x → rtsp://user:***@host/live?***),
    for logs and statuses: a camera's query string often carries an access token."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    rest, question, _query = rest.partition("?")
    hidden_query = "?***" if question else ""
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not at or ":" not in userinfo:
        return f"{scheme}://{rest}{hidden_query}"
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}{slash}{path}{hidden_query}"


@dataclass
class _Grabber:
    generation: int
    thread: threading.Thread
    progress_at: float  # monotonic time of the last sign of life (open started, frame read)
    phase: str = "opening"  # opening | reading | waiting (throttle, back-pressure) | ended | failed
    error: str | None = None


@register_source_kind("video", settings=CaptureSettings)
@register_source_kind("camera", "rtsp", "http", settings=CaptureSettings, live=True)
class OpenCVCaptureSource(FrameSource):
    spec: CaptureSettings

    def __init__(self, spec: CaptureSettings, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        spec = self.spec
        if spec.uri in ("", None):
            raise ValueError(f"{spec.kind} source {spec.id!r} needs a uri")
        self.is_file = spec.kind == "video"
        self.loop = spec.loop
        self.open_timeout_ms = spec.open_timeout_ms
        self.read_timeout_ms = spec.read_timeout_ms
        default_watchdog = max(self.open_timeout_ms, self.read_timeout_ms) / 1000.0 + 5.0
        self.watchdog_s = spec.watchdog_s if spec.watchdog_s is not None else default_watchdog
        self.backoff = Backoff(spec.backoff_initial_s, spec.backoff_max_s)
        self.finished = threading.Event()
        self._generation = 0
        self._lock = threading.Lock()
        self._grabber: _Grabber | None = None
        self._pass = 0
        self._frame_index = 0  # next frame index of the current pass (files): survives reconnects
        self._live_throttle = Throttle(spec.max_fps)
        # (source id, frame-id prefix) -> recorded frame ids (SourceContext.recorded_frame_ids): files resume there
        self.recorded_frame_ids: Callable[[str, str], list[str]] | None = None
        self._resumed = False

    @classmethod
    def from_context(cls, settings: CaptureSettings, context: SourceContext) -> OpenCVCaptureSource:
        source = cls(settings, queue_size=context.queue_size, on_status=context.on_status)
        source.recorded_frame_ids = context.recorded_frame_ids
        return source

    def _file_name(self) -> str:
        return os.path.basename(str(self.spec.uri))

    def _resume(self) -> None:
        """A video file restarts after the last frame already in the database (pass and index from its frame
        ids), so a restarted daemon does not run the whole file through the model again. A failing lookup is
        logged and the file starts over (the database still dedupes on frame_id)."""
        if not self.is_file or self.recorded_frame_ids is None or self._resumed:
            return
        self._resumed = True  # once: afterwards (a restarted loop, a reconnect) the position in memory is ahead
        prefix = f"{self.id}:{self._file_name()}"
        try:
            recorded = self.recorded_frame_ids(self.id, prefix)
        except Exception as exc:
            self.log.warning("source %s: cannot look up the frames already inspected (%s); starting at frame 0",
                             self.id, exc)
            return
        pattern = re.compile(re.escape(prefix) + r"(?:#(\d+))?:(\d+)")
        positions = [(int(match[1] or 0), int(match[2])) for frame_id in recorded
                     if (match := pattern.fullmatch(frame_id))]
        if positions:
            self._pass, last = max(positions)
            self._frame_index = last + 1
            self.log.info("video %s: resuming after frame %d%s (already inspected)", self.spec.uri, last,
                          f" of pass {self._pass}" if self._pass else "")

    # -- opening ---------------------------------------------------------------------------------------------
    def _target(self) -> tuple[int | str, int]:
        uri = str(self.spec.uri)
        backend_name = self.spec.backend
        api = getattr(cv2, f"CAP_{str(backend_name).upper()}") if backend_name else cv2.CAP_ANY
        if self.kind == "camera":
            if uri.isdigit():
                return int(uri), api
            if api == cv2.CAP_ANY and uri.startswith("/dev/video"):
                api = cv2.CAP_V4L2
        if self.kind in ("rtsp", "http", "video") and api == cv2.CAP_ANY:
            api = cv2.CAP_FFMPEG
        return uri, api

    def _open(self) -> cv2.VideoCapture:
        target, api = self._target()
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, self.open_timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                  self.read_timeout_ms]
        cap = cv2.VideoCapture(target, api, params)
        if not cap.isOpened():
            cap.release()
            if self.is_file and not os.path.exists(str(target)):
                raise OSError(f"video file {target} does not exist")
            backend = self.spec.backend or {cv2.CAP_FFMPEG: "FFMPEG", cv2.CAP_V4L2: "V4L2"}.get(api, "any backend")
            if self.is_file:
                why = "not a video OpenCV can read, or no permission to read it"
            elif self.kind == "camera":
                why = "no such device, busy, or no permission"
            else:
                why = (f"unreachable, refused, wrong path or credentials, or no answer within "
                       f"open_timeout_ms={self.open_timeout_ms}")
            shown = target if isinstance(target, int) else display_uri(str(target))
            raise OSError(f"cannot open {self.kind} {shown!r} with {backend}: {why}")
        if self.kind == "camera":
            for option, prop in (("width", cv2.CAP_PROP_FRAME_WIDTH), ("height", cv2.CAP_PROP_FRAME_HEIGHT),
                                 ("fps", cv2.CAP_PROP_FPS)):
                if getattr(self.spec, option):
                    cap.set(prop, float(getattr(self.spec, option)))
        if self.is_file and self._frame_index:
            cap.set(cv2.CAP_PROP_POS_FRAMES, self._frame_index)  # resume after a reconnect
        return cap

    # -- grabber thread --------------------------------------------------------------------------------------
    def _current(self, grabber: _Grabber) -> bool:
        return grabber.generation == self._generation and not self._stop_event.is_set()

    def _grab_loop(self, grabber: _Grabber) -> None:
        cap: cv2.VideoCapture | None = None
        try:
            cap = self._open()
            if not self._current(grabber):
                return
            grabber.phase = "reading"
            grabber.progress_at = time.monotonic()
            self._set_status(SourceStatus.ONLINE)
            self.backoff.reset()
            while self._current(grabber):
                if self.is_file:
                    ok, bgr = cap.read()
                    if not ok:
                        grabber.phase = "ended"
                        return
                else:
                    if not cap.grab():
                        raise OSError(f"read from {self.kind} {display_uri(str(self.spec.uri))!r} failed or timed "
                                      f"out (read_timeout_ms={self.read_timeout_ms}): stream ended or connection lost")
                    grabber.progress_at = time.monotonic()
                    if not self._live_throttle.ready():
                        self.counters.incr("frames_skipped")
                        continue
                    ok, bgr = cap.retrieve()
                    if not ok:
                        raise OSError(f"cannot decode a frame from {self.kind} {display_uri(str(self.spec.uri))!r}")
                    self._live_throttle.mark()
                if not self._current(grabber):
                    return
                grabber.phase = "waiting"
                if self._emit(self._make_frame(bgr), throttle=self.is_file) and self.is_file:
                    self._frame_index += 1
                grabber.progress_at, grabber.phase = time.monotonic(), "reading"
        except Exception as exc:
            grabber.phase = "failed"
            grabber.error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, OSError) else str(exc)
        finally:
            if cap is not None:
                cap.release()

    def _make_frame(self, bgr: np.ndarray) -> Frame:
        if bgr.ndim == 2:
            rgb = cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB)
        else:
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGRA2RGB if bgr.shape[2] == 4 else cv2.COLOR_BGR2RGB)
        meta = self._base_meta()
        if self.is_file:
            index = self._frame_index
            name = self._file_name()
            pass_tag = f"#{self._pass}" if self._pass else ""
            frame_id = f"{self.id}:{name}{pass_tag}:{index}"
            meta.update(frame_index=index, loop_pass=self._pass)
            label = f"{self.spec.uri}[{index}]"
        else:
            frame_id = f"{self.id}:{uuid.uuid4().hex}"
            label = f"{display_uri(str(self.spec.uri))}@{frame_id.rsplit(':', 1)[-1][:8]}"
        return Frame(frame_id=frame_id, source_id=self.id, captured_at=utc_now(), image=rgb, name=label, meta=meta)

    # -- supervisor (the source thread) ----------------------------------------------------------------------
    def _start_grabber(self) -> _Grabber:
        with self._lock:
            self._generation += 1
            grabber = _Grabber(self._generation, None, time.monotonic())  # type: ignore[arg-type]
            grabber.thread = threading.Thread(target=self._grab_loop, args=(grabber,),
                                              name=f"grabber-{self.id}-{grabber.generation}", daemon=True)
            self._grabber = grabber
        grabber.thread.start()
        return grabber

    def _run(self) -> None:
        self._resume()
        attempt = 0
        while not self._stop_event.is_set():
            if attempt:
                self.counters.incr("reconnects")
            attempt += 1
            grabber = self._start_grabber()
            while grabber.thread.is_alive() and not self._stop_event.is_set():
                grabber.thread.join(0.2)
                if grabber.phase not in ("opening", "reading"):
                    continue  # waiting on max_fps or a full queue is not being stuck
                limit = self.watchdog_s if grabber.phase == "reading" else self.watchdog_s + self.open_timeout_ms / 1000
                if time.monotonic() - grabber.progress_at > limit:
                    grabber.phase = "failed"
                    grabber.error = f"no progress for {limit:.1f}s (watchdog)"
                    with self._lock:
                        self._generation += 1  # the stuck thread exits and releases its capture when it wakes
                    break
            if self._stop_event.is_set():
                break
            if grabber.phase == "ended":
                if self.loop:
                    self._pass += 1
                    self._frame_index = 0
                    attempt = 0
                    continue
                self.finished.set()
                self.log.info("video %s finished after %d frames", self.spec.uri, self._frame_index)
                return
            self._error(grabber.error or "capture stopped")
            self._set_status(SourceStatus.OFFLINE)
            self._stop_event.wait(self.backoff.next())

    def stop(self, timeout: float = 5.0) -> None:
        super().stop(timeout)
        grabber = self._grabber
        if grabber is not None and grabber.thread.is_alive():
            grabber.thread.join(max(0.1, min(timeout, 1.0)))
