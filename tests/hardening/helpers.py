"""Shared pieces of the hardening tests: a pipeline around any source, a source that redelivers, row counts."""

from __future__ import annotations

import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import select

import model.preprocess  # noqa: F401 - imported here, not by the first frame's decode thread (seconds, cold)
from adapters.db import Inspection, RejectedFrame
from adapters.sources.base import Frame, FrameQueue, SourceCounters, SourceSettings, SourceStatus
from adapters.storage import ArtifactStore
from daemon.frames.pipeline import Pipeline, PipelineOptions


def make_pipeline(sessions, tmp_path: Path, sources: list[Any], detector, **options) -> Pipeline:
    store = ArtifactStore(tmp_path / "artifacts")
    settings = {s.id: SourceSettings(id=s.id, line=s.line, threshold=0.5) for s in sources}
    return Pipeline(detector, sources, sessions, store, source_settings=settings,
                    options=PipelineOptions(max_batch_size=4, max_batch_delay_s=0.01, **options))


def rows(sessions) -> tuple[dict[str, Inspection], dict[str, RejectedFrame]]:
    with sessions() as session:
        inspections = {row.frame_id: row for row in session.scalars(select(Inspection))}
        rejected = {row.frame_id: row for row in session.scalars(select(RejectedFrame))}
        session.expunge_all()
    return inspections, rejected


class RedeliveringSource:
    """Like a broker: a frame handed back with done(False) is queued again (same frame_id), up to `limit` times."""

    kind = "memory"

    def __init__(self, source_id: str = "cam", line: str = "l1", limit: int = 50) -> None:
        self.id, self.line, self.class_name, self.threshold = source_id, line, None, 0.5
        self.counters = SourceCounters()
        self.queue = FrameQueue(1000, "all", self.counters)
        self.status = SourceStatus.ONLINE
        self.on_status = None
        self.deliveries: dict[str, int] = {}
        self.acked: dict[str, bool] = {}
        self.limit = limit
        self._lock = threading.Lock()

    def start(self) -> None: ...

    def stop(self, timeout: float = 5.0) -> None:
        self.status = SourceStatus.OFFLINE

    def push(self, frame_id: str, data: bytes, source_id: str | None = None) -> None:
        with self._lock:
            self.deliveries[frame_id] = self.deliveries.get(frame_id, 0) + 1
            if self.deliveries[frame_id] > self.limit:
                return

        def done(ok: bool) -> None:
            if ok:
                with self._lock:
                    self.acked[frame_id] = True
            else:
                self.push(frame_id, data, source_id)

        frame = Frame(frame_id=frame_id, source_id=source_id or self.id, captured_at=datetime.now(timezone.utc),
                      data=data, name=f"{frame_id[:40]}.png", meta={"line": self.line}, on_done=done)
        self.queue.put(frame)
