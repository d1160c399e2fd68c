"""Frame sources of the anomalyd daemon: each runs in its own thread and fills its own bounded `FrameQueue`.

Contract with the pipeline (daemon core)::

    source = build_source(settings, SourceContext(queue_size=cfg.runtime.queue_size, redis_url=...,
                          redis_stream=..., redis_group=..., consumer_name=None, mqtt_username=None,
                          mqtt_password=None, on_status=publish_status))
    source.start()
    frame = source.queue.get(timeout=0.1)     # Frame | None
    ...                                       # decode frame.data (or use frame.image), score, commit
    frame.done(True)                          # after the inspection row or rejected row is committed
    frame.done(False)                         # not processed (shutdown, transient DB error): retried later
    source.stop(timeout=5.0)                  # frames already queued stay in source.queue

`settings` is a `SourceSettings` (the registered kind's subclass) or a plain mapping (a `[[sources]]` table):
id, kind (camera|rtsp|http|video|folder|redis|mqtt, plus any kind registered with
`adapters.sources.registry.register_source_kind`), uri, line, max_fps (0/None = unlimited), policy (latest|all;
default latest for live kinds — camera/rtsp/http —, all for the others), class_name, threshold, pixel_threshold,
enabled, queue_size, plus the kind's own keys (next to these or in an `options` table; each kind's settings
model documents them).

`Frame`: frame_id (idempotency key, stable across redelivery and restarts: the DB keeps one row per frame_id),
source_id, captured_at (aware UTC), data (encoded bytes) or image (RGB uint8 HxWx3), name (for logs and rejected
rows), meta (always `line` and `kind`; `class_name` when configured; `content_type`, `topic`,
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

from typing import Any

from adapters.sources.base import Frame, FrameQueue, SourceCounters, SourceSettings, SourceStatus
from adapters.sources.registry import (
    SourceContext,
    SourceKind,
    build_source,
    parse_source_settings,
    queue_policy,
    register_source_kind,
    source_kind,
    source_kinds,
)
from adapters.sources.source import Backoff, FrameSource, Throttle

__all__ = [
    "Backoff",
    "Frame",
    "FrameQueue",
    "FrameSource",
    "RedisFrameWriter",
    "SourceContext",
    "SourceCounters",
    "SourceKind",
    "SourceSettings",
    "SourceStatus",
    "Throttle",
    "build_source",
    "parse_source_settings",
    "queue_policy",
    "register_source_kind",
    "source_kind",
    "source_kinds",
]


def __getattr__(name: str) -> Any:
    # Lazy: importing the package must not import redis/paho/cv2 for users of the plain types.
    if name == "RedisFrameWriter":
        from adapters.sources.redis_stream import RedisFrameWriter

        return RedisFrameWriter
    raise AttributeError(name)
