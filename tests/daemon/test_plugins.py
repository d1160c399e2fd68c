"""Extension points end to end: a source kind and a result sink registered from inside the test (no project file
knows them) run in the real daemon: config validation of the kind's own keys, rows written, the sink told about
exactly the committed results, after their commit."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from pydantic import Field
from sqlalchemy import select

from adapters.db import Inspection
from adapters.sinks import CommittedInspection, ResultSink, SinkContext, register_sink, unregister_sink
from adapters.sources import (
    Frame,
    FrameSource,
    SourceSettings,
    SourceStatus,
    queue_policy,
    register_source_kind,
    source_kinds,
)
from adapters.sources.registry import unregister_source_kind
from adapters.timeutil import utc_now
from daemon.config.settings import ConfigError, load_config
from daemon.process.service import Service
from tests.daemon.test_pipeline import BrightnessDetector
from tests.waiting import wait_until


class PatternSettings(SourceSettings):
    """`kind = "toy-pattern"`: `count` flat gray frames, brightness going up by `step`."""

    kind: Literal["toy-pattern"]
    count: int = Field(6, ge=1)
    step: int = Field(40, ge=1, le=255)


class PatternSource(FrameSource):
    spec: PatternSettings

    def _run(self) -> None:
        self._set_status(SourceStatus.ONLINE)
        for index in range(self.spec.count):
            image = np.full((24, 32, 3), min(255, index * self.spec.step), np.uint8)
            frame = Frame(frame_id=f"{self.id}:{index}", source_id=self.id, captured_at=utc_now(), image=image,
                          name=f"pattern-{index}", meta=self._base_meta())
            if not self._emit(frame):
                return
        self._stop_event.wait()


class RecordingSink(ResultSink):
    name = "recording"

    def __init__(self, context: SinkContext) -> None:
        self.sessions = context.sessions
        self.results: list[CommittedInspection] = []
        self.stored_when_told: list[bool] = []
        self.statuses: list[tuple[str, str]] = []
        self.alert_wakeups = 0

    def inspection_committed(self, result: CommittedInspection) -> None:
        with self.sessions() as session:  # the row must already be visible to another session
            self.stored_when_told.append(session.get(Inspection, result.inspection_id) is not None)
        self.results.append(result)

    def alerts_committed(self) -> None:
        self.alert_wakeups += 1

    def source_status(self, line: str, source_id: str, status: str) -> None:
        self.statuses.append((source_id, status))


@pytest.fixture
def plugins():
    sinks: list[RecordingSink] = []

    def build(_settings, context: SinkContext) -> RecordingSink:
        sink = RecordingSink(context)
        sinks.append(sink)
        return sink

    register_source_kind("toy-pattern", settings=PatternSettings)(PatternSource)
    register_sink("recording", section=None)(build)
    try:
        yield sinks
    finally:
        unregister_source_kind("toy-pattern")
        unregister_sink("recording")
    assert "toy-pattern" not in source_kinds()


def write_config(tmp_path: Path, extra: str = "") -> Path:
    config = tmp_path / "config.toml"
    config.write_text(f"""
[runtime]
max_batch_delay_ms = 5
[[sources]]
id = "toy"
kind = "toy-pattern"
line = "bench"
threshold = 0.5
count = 6
step = 50
{extra}
[mqtt]
enabled = false
[database]
url = "sqlite:///var/anomalyd.db"
[storage]
dir = "var/artifacts"
[api]
enabled = false
""")
    return config


def test_a_registered_source_kind_is_a_config_kind_with_its_own_keys(tmp_path, plugins):
    settings = load_config(write_config(tmp_path), environ={})
    source = settings.sources[0]
    assert isinstance(source, PatternSettings) and (source.count, source.step) == (6, 50)
    assert queue_policy(source) == "all"  # not registered as live
    with pytest.raises(ConfigError, match=r"unknown key \[\[sources\]\]\[0\]\.colour"):
        load_config(write_config(tmp_path, 'colour = "red"'), environ={})
    bad_step = write_config(tmp_path)
    bad_step.write_text(bad_step.read_text().replace("step = 50", "step = 0"))
    with pytest.raises(ConfigError, match=r"\[\[sources\]\]\[0\]\.step"):
        load_config(bad_step, environ={})


def test_daemon_runs_a_toy_source_kind_into_rows_and_a_toy_sink(tmp_path, plugins):
    service = Service(load_config(write_config(tmp_path), environ={}), detector=BrightnessDetector(image_size=32))
    service.start()
    try:
        assert wait_until(lambda: service.pipeline.processed >= 6, 60), f"{service.pipeline.processed} of 6"
        sink = plugins[0]
        assert wait_until(lambda: len(sink.results) >= 6, 30)
        assert ("toy", "online") in sink.statuses
    finally:
        service.stop()
    with service.sessions() as session:
        rows = session.scalars(select(Inspection).order_by(Inspection.frame_id)).all()
    assert [row.frame_id for row in rows] == [f"toy:{index}" for index in range(6)]
    assert {(row.source, row.line, row.threshold) for row in rows} == {("toy", "bench", 0.5)}
    anomalous = [row.frame_id for row in rows if row.is_anomalous]
    assert anomalous and len(anomalous) < len(rows)  # BrightnessDetector: score = mean brightness
    assert sorted(result.frame_id for result in sink.results) == [row.frame_id for row in rows]
    assert all(sink.stored_when_told)
    assert sink.alert_wakeups == len(anomalous)
    assert ("toy", "offline") in sink.statuses
