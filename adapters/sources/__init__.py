"""Frame sources of the anomalyd daemon: each runs in its own thread and fills its own bounded `FrameQueue`.

Contract with the pipeline (daemon core)::

    source = build_source(spec, queue_size=cfg.runtime.queue_size, redis_url=..., redis_stream=...,
                          redis_group=..., consumer_name=None, mqtt_username=None, mqtt_password=None,
                          on_status=publish_status)
    source.start()
    frame = source.queue.get(timeout=0.1)     # Frame | None
    ...                                       # decode frame.data (or use frame.image), score, commit
    frame.done(True)                          # after the inspection row or rejected row is committed
    frame.done(False)                         # not processed (shutdown, transient DB error): retried later
    source.stop(timeout=5.0)                  # frames already queued stay in source.queue

`spec` is a `SourceSpec`, a plain mapping (a `[[sources]]` table) or a pydantic model (`model_dump()` is used):
id, kind (camera|rtsp|http|video|folder|redis|mqtt), uri, line, max_fps (0/None = unlimited), policy
(latest|all; default latest for camera/rtsp/http, all for video/folder/redis/mqtt), class_name, threshold,
enabled, plus kind-specific options (an `options` table or any other key; see each module's docstring).

`Frame`: frame_id (idempotency key, stable across redelivery and restarts: the DB keeps one row per frame_id),
source_id, captured_at (aware UTC), data (encoded bytes) or image (RGB uint8 HxWx3), name (for logs and rejected
rows), meta (always `line` and `kind`; `class_name`/`threshold` when configured; `content_type`, `topic`,
`entry_id`, `path`, ... by kind; `error` when the source could not read the input: then data and image are None
and the pipeline must record a rejected row with that reason), on_done; `frame.line` is `meta["line"]`.
`Frame.done(ok)` calls on_done at most once and never raises; sources with nothing to acknowledge leave on_done
None. Redis frames carry the producer's source id as `source_id` (the worker-side source id is `meta["via"]`).

`FrameSource` attributes: id, kind, line, class_name, threshold, max_fps, status (`SourceStatus`
online/offline/disabled), counters (`SourceCounters`: frames_in, frames_dropped, frames_skipped, errors,
reconnects; `.snapshot()` → dict), queue, last_error, on_status(source, status) (called on every change, from the
source's threads: the daemon publishes it retained on MQTT). A source with `enabled = false` stays DISABLED and
starts no thread.

What acknowledging means per kind: folder → move to processed/ (or delete / rename to .done); redis → XACK;
mqtt → PUBACK (manual ack; persistent session); camera/video → nothing. Frames dropped by the `latest` policy
are acknowledged (done(True)) so they are not redelivered forever.

Scale-out: on `--role capture` hosts, forward each frame with `RedisFrameWriter(url, stream).append_frame(frame)`
(then `frame.done(True)` once XADD returned); workers use a `kind = "redis"` source.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from adapters.sources.base import (
    Backoff,
    Frame,
    FrameQueue,
    FrameSource,
    SourceCounters,
    SourceSpec,
    SourceStatus,
    Throttle,
)

__all__ = [
    "Backoff",
    "Frame",
    "FrameQueue",
    "FrameSource",
    "RedisFrameWriter",
    "SourceCounters",
    "SourceSpec",
    "SourceStatus",
    "Throttle",
    "build_source",
]


def build_source(spec: SourceSpec | Mapping[str, Any] | Any, *, queue_size: int = 16, redis_url: Any = None,
                 redis_stream: str | None = None, redis_group: str | None = None, consumer_name: str | None = None,
                 mqtt_username: str | None = None, mqtt_password: Any = None,
                 on_status: Callable[[FrameSource, SourceStatus], None] | None = None) -> FrameSource:
    """Create (not start) the source for one `[[sources]]` entry. Bad config raises ValueError naming the source.

    The redis_* keywords come from the `[redis]` section (a source's own `url`/`stream`/`group`/`consumer`
    options win); mqtt_* credentials apply to `kind = "mqtt"` sources whose uri/options carry none.
    """
    spec = SourceSpec.from_mapping(spec)
    common: dict[str, Any] = {"queue_size": queue_size, "on_status": on_status}
    if spec.kind == "folder":
        from adapters.sources.folder import FolderSource

        return FolderSource(spec, **common)
    if spec.kind in ("camera", "rtsp", "http", "video"):
        from adapters.sources.opencv_capture import OpenCVCaptureSource

        return OpenCVCaptureSource(spec, **common)
    if spec.kind == "redis":
        from adapters.sources.redis_stream import RedisStreamSource

        return RedisStreamSource(spec, redis_url=redis_url, redis_stream=redis_stream, redis_group=redis_group,
                                 consumer_name=consumer_name, **common)
    if spec.kind == "mqtt":
        from adapters.sources.mqtt_images import MqttImageSource

        return MqttImageSource(spec, mqtt_username=mqtt_username, mqtt_password=mqtt_password, **common)
    raise ValueError(f"source {spec.id!r}: unknown kind {spec.kind!r}")  # from_mapping already checks


def __getattr__(name: str) -> Any:
    # Lazy: importing the package must not import redis/paho/cv2 for users of the plain types.
    if name == "RedisFrameWriter":
        from adapters.sources.redis_stream import RedisFrameWriter

        return RedisFrameWriter
    raise AttributeError(name)
