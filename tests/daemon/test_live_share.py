"""Live `latest` sources under a file backlog (issue 10, Sources): a camera's frames are inspected while hundreds of
files drain, within about a batch time of their capture; the backlog keeps its share of every batch and loses
nothing. The batcher's weighted round-robin between the live lane and the backlog is checked on its own first."""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import pytest
from pydantic import Field
from sqlalchemy import select

from adapters.db import Inspection, RejectedFrame
from adapters.sources import Frame, FrameSource, SourceSettings, SourceStatus, register_source_kind
from adapters.sources.base import FrameQueue, SourceCounters
from adapters.sources.registry import unregister_source_kind
from adapters.storage import ArtifactStore
from adapters.timeutil import utc_now
from daemon.config.settings import load_config
from daemon.frames.batcher import DynamicBatcher
from daemon.frames.budget import ByteBudget
from daemon.frames.pipeline import Pipeline, PipelineOptions
from daemon.process.service import Service
from tests.daemon.test_pipeline import BrightnessDetector, MemorySource, png
from tests.waiting import wait_until

# --- the batcher's two lanes ----------------------------------------------------------------------------------


def test_live_items_share_each_batch_with_the_backlog():
    batcher = DynamicBatcher(8, max_batch_delay_s=0.0, maxsize=64)
    for index in range(40):
        batcher.put(f"file{index}")
    assert batcher.live_room() == 4  # half of a batch while a backlog waits
    for index in range(6):
        batcher.put(f"cam{index}", live=True)
    first = batcher.get_batch(timeout=1)
    assert sorted(item for item in first if item.startswith("cam")) == ["cam0", "cam1", "cam2", "cam3"]
    assert [item for item in first if item.startswith("file")] == ["file0", "file1", "file2", "file3"]
    second = batcher.get_batch(timeout=1)  # the two live items left go first, the backlog fills the rest
    assert [item for item in second if item.startswith("cam")] == ["cam4", "cam5"]
    assert [item for item in second if item.startswith("file")] == [f"file{index}" for index in range(4, 10)]


def test_a_single_slot_batch_alternates_so_neither_lane_starves():
    batcher = DynamicBatcher(1, max_batch_delay_s=0.0, maxsize=64)
    for index in range(10):
        batcher.put(f"file{index}")
    taken = []
    for index in range(10):
        if batcher.live_room():
            batcher.put(f"cam{index}", live=True)  # a camera always has a newer frame
        taken.extend(batcher.get_batch(timeout=1))
    assert [item[:3] for item in taken] == ["cam", "fil"] * 5


def test_an_idle_lane_earns_no_burst_and_live_fills_batches_without_backlog():
    batcher = DynamicBatcher(4, max_batch_delay_s=0.0, maxsize=64, live_share=0.25)
    for index in range(12):
        batcher.put(f"file{index}")
    assert [batcher.get_batch(timeout=1) for _ in range(3)][-1] == ["file8", "file9", "file10", "file11"]
    assert batcher.live_room() == 4  # no backlog: a whole batch may be live
    for index in range(4):
        batcher.put(f"cam{index}", live=True)
    assert batcher.get_batch(timeout=1) == ["cam0", "cam1", "cam2", "cam3"]
    for index in range(8):
        batcher.put(f"file{index}")
        batcher.put(f"cam{index}", live=True)
    # The backlog had nothing while the camera frames went alone: no credit either way, live gets its quarter.
    assert [item[:3] for item in batcher.get_batch(timeout=1)].count("cam") == 1
    with pytest.raises(ValueError):
        DynamicBatcher(4, 0.0, live_share=1.0)


def test_live_frames_are_due_just_before_the_batch_in_progress_ends():
    clock = [100.0]
    batcher = DynamicBatcher(2, max_batch_delay_s=0.0, maxsize=64, clock=lambda: clock[0])
    assert batcher.live_due_in(0.01) == 0  # no estimate yet: at once
    for index in range(8):
        batcher.put(f"file{index}")
    batcher.get_batch(timeout=1)
    clock[0] = 101.0  # the consumer comes back one second later with work waiting: batches take 1 s
    batcher.get_batch(timeout=1)
    clock[0] = 101.5
    assert batcher.live_due_in(0.1) == pytest.approx(0.3)  # 0.9 of a batch after the last one, less the lead
    assert batcher.wait_live_due(0.1, timeout=0.01) is False
    clock[0] = 101.85
    assert batcher.live_due_in(0.1) == 0 and batcher.wait_live_due(0.1, timeout=0.01) is True
    batcher.get_batch(timeout=1)
    batcher.get_batch(timeout=1)  # the backlog is gone: live frames may come at once, whole batches of them
    assert len(batcher) == 0 and batcher.live_due_in(0.1) == 0 and batcher.live_room() == 2


def test_a_forming_batch_waits_for_a_live_frame_in_decode_up_to_the_batch_delay():
    # The delay is long against the decode (0.05 s) so that a busy CI machine cannot make the decode miss it.
    batcher = DynamicBatcher(4, max_batch_delay_s=1.0, maxsize=64)
    for index in range(8):
        batcher.put(f"file{index}")
    decoding = [1]
    asked = threading.Event()

    def incoming() -> int:
        asked.set()  # the forming batch looks at the decodes in progress: it is waiting from now on
        return decoding[0]

    batcher.live_incoming = incoming

    def decoded() -> None:
        asked.wait(10)
        time.sleep(0.05)
        decoding[0] = 0
        batcher.put("cam", live=True)

    threading.Thread(target=decoded).start()
    assert "cam" in batcher.get_batch(timeout=1)  # the batch was full of files, yet it waited for the camera
    started = time.monotonic()
    decoding[0] = 1  # a decode that never delivers: the batch leaves after the delay
    assert batcher.get_batch(timeout=1) == ["file3", "file4", "file5", "file6"]
    assert 0.95 <= time.monotonic() - started < 3.0


def test_newest_frame_supersedes_the_older_ones_and_priority_budget():
    counters = SourceCounters()
    queue = FrameQueue(4, "latest", counters)
    acks: dict[str, bool] = {}
    for index in range(3):
        queue.put(Frame(frame_id=str(index), source_id="cam", captured_at=utc_now(),
                        on_done=lambda ok, key=str(index): acks.__setitem__(key, ok)))
    assert queue.take_newest(timeout=0).frame_id == "2"
    assert len(queue) == 0 and acks == {"0": True, "1": True}  # superseded: dropped and acknowledged
    assert counters.frames_dropped == 2 and queue.dropped == 2
    assert queue.take_newest(timeout=0.01) is None

    budget = ByteBudget(100)
    budget.acquire(100)
    order: list[str] = []
    backlog = threading.Thread(target=lambda: (budget.acquire(60), order.append("backlog")))
    backlog.start()
    time.sleep(0.05)
    live = threading.Thread(target=lambda: (budget.acquire(60, priority=True), order.append("live")))
    live.start()
    assert wait_until(lambda: budget._priority_waiting == 1, 10)  # the live frame waits (a slow machine: not yet)
    budget.release(100)  # room for one of them: the live frame, although the backlog frame waited longer
    live.join(10)
    time.sleep(0.2)
    assert order == ["live"]
    budget.release(60)
    backlog.join(10)
    assert order == ["live", "backlog"]


# --- the daemon: a folder backlog and a live camera ----------------------------------------------------------

BATCH = 8
MODEL_S = 0.08  # the model's time per batch
CAMERA_VALUE = 230  # camera frames are bright, files dark: the detector tells them apart in each batch
FILES = 240


class ToyCameraSettings(SourceSettings):
    """`kind = "toy-live-camera"`: flat bright frames at `fps` (a live kind: queue policy `latest`)."""

    kind: Literal["toy-live-camera"]
    fps: float = Field(12.0, gt=0)


class ToyCamera(FrameSource):
    spec: ToyCameraSettings

    def _run(self) -> None:
        self._set_status(SourceStatus.ONLINE)
        count = 0
        while not self._stop_event.wait(1 / self.spec.fps):
            image = np.full((24, 32, 3), CAMERA_VALUE, np.uint8)
            frame = Frame(frame_id=f"{self.id}:{count}", source_id=self.id, captured_at=utc_now(), image=image,
                          name=f"camera-{count}", meta=self._base_meta())
            count += 1
            if not self._emit(frame, throttle=False):
                return


class CountingDetector(BrightnessDetector):
    """A model taking MODEL_S per batch that records, per batch, when it ran and how many camera frames it had."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[tuple[float, float, int, int]] = []  # (start, end, camera frames, file frames)

    def predict(self, images, class_names=None):
        started = time.monotonic()
        time.sleep(MODEL_S)
        prediction = super().predict(images, class_names)
        camera = int((prediction.scores > 0.6).sum())
        self.batches.append((started, time.monotonic(), camera, len(prediction.scores) - camera))
        return prediction


@pytest.fixture
def toy_camera_kind():
    register_source_kind("toy-live-camera", settings=ToyCameraSettings, live=True)(ToyCamera)
    try:
        yield
    finally:
        unregister_source_kind("toy-live-camera")


def test_live_frames_are_fresh_while_a_folder_backlog_drains_and_no_file_is_lost(tmp_path: Path, toy_camera_kind):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    ok, dark = cv2.imencode(".png", np.full((24, 32, 3), 40, np.uint8))
    assert ok
    for index in range(FILES):
        (inbox / f"part-{index:04d}.png").write_bytes(dark.tobytes())
    config = tmp_path / "config.toml"
    config.write_text(f"""
[runtime]
max_batch_size = {BATCH}
max_batch_delay_ms = 10
shutdown_grace_s = 10
[database]
url = "sqlite:///var/anomalyd.db"
[storage]
dir = "var/artifacts"
artifacts = "anomalous"
save_frames = false
[api]
bind = "127.0.0.1:0"
[mqtt]
enabled = false
[[sources]]
id = "inbox"
kind = "folder"
uri = "inbox"
line = "l1"
settle_s = 0
poll_interval_s = 0.05
[[sources]]
id = "cam"
kind = "toy-live-camera"
line = "l1"
""")
    detector = CountingDetector()
    service = Service(load_config(config, environ={}), detector=detector)
    service.start()
    try:
        assert [source.queue.policy for source in service.sources] == ["all", "latest"]

        def files_done() -> int:
            with service.sessions() as session:
                return len(session.scalars(select(Inspection.id).where(Inspection.source == "inbox")).all())

        assert wait_until(lambda: files_done() == FILES, timeout=45, interval=0.1), f"{files_done()} of {FILES}"
    finally:
        service.stop()
    with service.sessions() as session:
        files = session.scalars(select(Inspection).where(Inspection.source == "inbox")).all()
        camera = session.scalars(select(Inspection).where(Inspection.source == "cam")).all()
        rejected = session.scalars(select(RejectedFrame)).all()
    # No file lost, none twice, each moved out of the inbox only once its row was committed.
    assert len({row.frame_id for row in files}) == FILES and not rejected
    assert sorted(path.name for path in (inbox / "processed").iterdir()) == \
        [f"part-{index:04d}.png" for index in range(FILES)]
    assert not list(inbox.glob("*.png"))

    backlog_start = min(row.processed_at for row in files)
    backlog_end = max(row.processed_at for row in files)
    during = [row for row in camera if backlog_start <= row.processed_at <= backlog_end]
    drain_s = (backlog_end - backlog_start).total_seconds()
    assert drain_s > 10 * MODEL_S, drain_s  # a real backlog: many batches
    # The camera is inspected throughout the drain, not after it ...
    assert len(during) >= drain_s * 3, (len(during), drain_s)
    # ... its frames within about one batch time of their capture (the batch running when it was captured,
    # then its own), where queued behind the backlog they waited for the whole queue ahead of them.
    # The batch time as the pipeline runs it: from one batch's start to the next's (model, and the writer when
    # the model waits for it), over the drain.
    starts = [start for start, _, _, _ in detector.batches]
    batch_s = statistics.median(later - earlier for earlier, later in itertools.pairwise(starts))
    ages = sorted((row.processed_at - row.captured_at).total_seconds() for row in during)
    median_age, p90_age = statistics.median(ages), ages[int(0.9 * (len(ages) - 1))]
    assert median_age <= 3 * batch_s + 0.05, (median_age, batch_s, ages)
    assert p90_age <= 5 * batch_s + 0.1, (p90_age, batch_s, ages)
    # ... while the backlog keeps most of each batch (the camera's 12 fps ask for about one place per batch).
    mixed = [(cam, file) for _, _, cam, file in detector.batches if cam and file]
    assert mixed and sum(file for _, file in mixed) >= 0.5 * sum(cam + file for cam, file in mixed)


class FeedingCamera:
    """A camera stand-in for the pipeline alone: a `latest` queue kept supplied with fresh frames by a thread."""

    kind = "camera"

    def __init__(self, source_id: str) -> None:
        self.id, self.line, self.class_name, self.threshold = source_id, "l1", None, 0.5
        self.counters = SourceCounters()
        self.queue = FrameQueue(4, "latest", self.counters)
        self.status = SourceStatus.ONLINE
        self.on_status = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        count = 0
        while not self._stop.wait(0.01):
            count += 1
            self.queue.put(Frame(frame_id=f"{self.id}:{count}", source_id=self.id, captured_at=utc_now(),
                                 image=np.full((8, 8, 3), CAMERA_VALUE, np.uint8), meta={"line": self.line}))

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)


def test_more_cameras_than_live_places_take_turns_and_the_backlog_still_drains(sqlite_sessions, tmp_path):
    cameras = [FeedingCamera(f"cam{index}") for index in range(3)]
    backlog = MemorySource("files")
    settings = {source.id: SourceSettings(id=source.id, line="l1") for source in [*cameras, backlog]}
    detector = CountingDetector()
    pipeline = Pipeline(detector, [*cameras, backlog], sqlite_sessions, ArtifactStore(tmp_path / "a", artifacts="anomalous"),
                        source_settings=settings, options=PipelineOptions(max_batch_size=2, max_batch_delay_s=0.005))
    for index in range(30):
        backlog.push(f"file{index}", data=png(40, size=(8, 8)))
    for camera in cameras:
        camera.start()
    pipeline.start()  # one live place per batch of two, three cameras asking for it all the time
    try:
        backlog.wait_acks(30, timeout=30)
    finally:
        for camera in cameras:
            camera.stop()
        pipeline.stop(10)
    assert all(backlog.acks.values())
    with sqlite_sessions() as session:
        files = session.scalars(select(Inspection).where(Inspection.source == "files")).all()
        last_file = max(row.processed_at for row in files)
        during = [row.source for row in session.scalars(select(Inspection).where(
            Inspection.source != "files", Inspection.processed_at <= last_file))]
    assert len(files) == 30
    counts = {camera.id: during.count(camera.id) for camera in cameras}
    assert min(counts.values()) >= max(3, max(counts.values()) / 2), counts  # turns, not first come first served
    files_seen = cameras_seen = 0
    for _, _, cam, file in detector.batches:
        if files_seen == 30:
            break
        files_seen, cameras_seen = files_seen + file, cameras_seen + cam
    assert cameras_seen <= 30 + 3, cameras_seen  # hungry cameras took about half of the places, not more
