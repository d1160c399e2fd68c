"""`--role capture`: a host with the cameras and no model forwards its sources' frames to the Redis stream that
GPU workers read (`[redis]`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from adapters.sources.source import FrameSource

log = logging.getLogger("anomalyd.service")


class CaptureForwarder:
    """One thread per source: its queued frames to the stream, acknowledged once appended."""

    def __init__(self, settings: Any, metrics: Any, stop_requested: threading.Event) -> None:
        from adapters.sources.redis_stream import RedisFrameWriter

        self.metrics = metrics
        self._stop_requested = stop_requested
        self._writer = RedisFrameWriter(settings.redis.url.get_secret_value(), settings.redis.stream,
                                        maxlen=settings.redis.maxlen)
        self.threads: list[threading.Thread] = []

    def start(self, sources: Sequence[FrameSource]) -> None:
        for source in sources:
            thread = threading.Thread(target=self._forward, args=(source,), name=f"forward-{source.id}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def join(self, deadline: float) -> None:
        for thread in self.threads:
            thread.join(max(0.1, deadline - time.monotonic() - 1))

    def _forward(self, source: FrameSource) -> None:
        while not self._stop_requested.is_set() or len(source.queue):
            frame = source.queue.get(timeout=0.2)
            if frame is None:
                continue
            try:
                self._writer.append_frame(frame)
            except ValueError as exc:
                log.warning("cannot forward frame %s: %s", frame.name or frame.frame_id, exc)
                frame.done(True)
            except Exception:
                log.exception("cannot forward frame %s to Redis", frame.frame_id)
                frame.done(False)
                time.sleep(1.0)
            else:
                frame.done(True)
                self.metrics.frames_in.labels(source.id).inc()
