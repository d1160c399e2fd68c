"""Pipeline with an injected fake detector and an in-memory source: rows, artifacts, rejects, redelivery, swap."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from sqlalchemy import func, select

from adapters.db import Inspection, OutboxMessage, RejectedFrame
from adapters.sources.base import Frame, FrameQueue, SourceCounters, SourceSettings, SourceStatus
from adapters.storage import ArtifactStore
from daemon.frames.pipeline import Pipeline, PipelineOptions


@dataclass
class Prediction:
    scores: torch.Tensor
    maps: torch.Tensor


class BrightnessDetector:
    """Score = mean brightness of the (un-normalised) input in [0,1]; the map is the per-pixel brightness."""

    name = "fake"

    def __init__(self, image_size: int = 32, version: str = "fake-v1") -> None:
        self.image_size = image_size
        self.version = version
        self.device = torch.device("cpu")
        self.calls: list[int] = []

    def predict(self, images: torch.Tensor, class_names=None) -> Prediction:
        assert images.shape[1:] == (3, self.image_size, self.image_size)
        self.calls.append(images.shape[0])
        std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
        mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
        pixels = (images * std + mean).clamp(0, 1).mean(dim=1)
        return Prediction(scores=pixels.mean(dim=(1, 2)), maps=pixels)


class ConstantDetector:
    name = "constant"

    def __init__(self, score: float = 0.0, image_size: int = 32, version: str = "const") -> None:
        self.score, self.image_size, self.version = score, image_size, version
        self.device = torch.device("cpu")

    def predict(self, images: torch.Tensor, class_names=None) -> Prediction:
        batch = images.shape[0]
        return Prediction(torch.full((batch,), self.score),
                          torch.full((batch, self.image_size, self.image_size), self.score))


class MemorySource:
    """A FrameSource stand-in: frames are put into its queue by the test."""

    kind = "memory"

    def __init__(self, source_id: str = "cam", line: str = "l1") -> None:
        self.id, self.line, self.class_name, self.threshold = source_id, line, None, 0.5
        self.counters = SourceCounters()
        self.queue = FrameQueue(1000, "all", self.counters)
        self.status = SourceStatus.ONLINE
        self.on_status = None
        self.acks: dict[str, bool] = {}
        self._lock = threading.Lock()

    def start(self) -> None: ...

    def stop(self, timeout: float = 5.0) -> None:
        self.status = SourceStatus.OFFLINE

    def push(self, frame_id: str, *, data: bytes | None = None, image: np.ndarray | None = None) -> Frame:
        def done(ok: bool) -> None:
            with self._lock:
                self.acks[frame_id] = ok

        frame = Frame(frame_id=frame_id, source_id=self.id, captured_at=datetime.now(timezone.utc), data=data,
                      image=image, name=f"{frame_id}.png", meta={"line": self.line}, on_done=done)
        assert self.queue.put(frame)
        return frame

    def wait_acks(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acks) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.acks) >= count, f"only {len(self.acks)} of {count} frames finished"


def png(value: int, size=(48, 40)) -> bytes:
    ok, buffer = cv2.imencode(".png", np.full((size[1], size[0], 3), value, np.uint8))
    assert ok
    return buffer.tobytes()


@pytest.fixture
def db(sqlite_sessions):
    return sqlite_sessions


def make_pipeline(db, tmp_path: Path, source: MemorySource, detector, *, artifacts: str = "all",
                  **options) -> Pipeline:
    store = ArtifactStore(tmp_path / "artifacts", artifacts=artifacts)
    settings = {source.id: SourceSettings(id=source.id, line=source.line, threshold=0.5)}
    return Pipeline(detector, [source], db, store, source_settings=settings,
                    options=PipelineOptions(max_batch_size=4, max_batch_delay_s=0.01, **options))


def test_frames_become_rows_artifacts_and_alerts(db, tmp_path):
    source = MemorySource()
    detector = BrightnessDetector()
    pipeline = make_pipeline(db, tmp_path, source, detector)
    pipeline.start()
    for i, value in enumerate([20, 240, 30, 250, 10]):
        source.push(f"f{i}", data=png(value))
    source.push("rgb", image=np.full((30, 50, 3), 200, np.uint8))
    source.push("empty", data=b"")
    source.push("junk", data=b"not an image at all")
    source.wait_acks(8)
    assert pipeline.stop(10)
    assert all(source.acks.values())  # everything committed (rows or rejected rows)
    with db() as session:
        rows = {row.frame_id: row for row in session.scalars(select(Inspection))}
        assert set(rows) == {"f0", "f1", "f2", "f3", "f4", "rgb"}
        assert {f for f, row in rows.items() if row.is_anomalous} == {"f1", "f3", "rgb"}
        assert rows["f1"].score == pytest.approx(240 / 255, abs=0.02)
        assert rows["f1"].regions == [{"x": 0, "y": 0, "w": 48, "h": 40, "area": 48 * 40,
                                       "peak": pytest.approx(240 / 255, abs=0.02)}]
        assert (rows["rgb"].width, rows["rgb"].height) == (50, 30)
        for row in rows.values():
            for path in (row.mask_path, row.heatmap_path, row.frame_path):
                assert (tmp_path / "artifacts" / path).is_file()
        mask = cv2.imread(str(tmp_path / "artifacts" / rows["f1"].mask_path), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (40, 48) and mask.min() == 255
        alerts = session.scalars(select(OutboxMessage)).all()
        assert sorted(a.inspection_id for a in alerts) == sorted(rows[f].id for f in ("f1", "f3", "rgb"))
        rejected = {r.frame_id: r.reason for r in session.scalars(select(RejectedFrame))}
        assert set(rejected) == {"empty", "junk"}
        assert "empty" in rejected["empty"] and "not a readable image" in rejected["junk"]
    assert max(detector.calls) <= 4


def test_anomalous_only_artifacts_keep_frames_for_every_row(db, tmp_path):
    source = MemorySource()
    pipeline = make_pipeline(db, tmp_path, source, BrightnessDetector(), artifacts="anomalous")
    pipeline.start()
    for i, value in enumerate([20, 240]):
        source.push(f"f{i}", data=png(value))
    source.wait_acks(2)
    assert pipeline.stop(10)
    with db() as session:
        rows = {row.frame_id: row for row in session.scalars(select(Inspection))}
    assert rows["f0"].mask_path is None and rows["f0"].heatmap_path is None and not rows["f0"].is_anomalous
    assert (tmp_path / "artifacts" / rows["f0"].frame_path).is_file()
    for path in (rows["f1"].mask_path, rows["f1"].heatmap_path, rows["f1"].frame_path):
        assert (tmp_path / "artifacts" / path).is_file()
    files = {p.name for p in (tmp_path / "artifacts").rglob("*") if p.is_file()}
    assert len(files) == 4  # f0: frame; f1: mask, heatmap, frame


def test_failed_batch_transaction_falls_back_to_one_per_frame(db, tmp_path, monkeypatch):
    """A batch whose transaction fails (e.g. another writer took one frame_id) is stored frame by frame."""
    from sqlalchemy.exc import IntegrityError

    import daemon.frames.writer as pipeline_module  # the result writer stores the batches

    batches: list[int] = []

    def failing(sessions, items):
        batches.append(len(items))
        raise IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed: inspections.frame_id"))

    monkeypatch.setattr(pipeline_module, "save_inspections", failing)
    source = MemorySource()
    pipeline = make_pipeline(db, tmp_path, source, ConstantDetector(0.9), persist_batch=8)
    for i in range(6):
        source.push(f"f{i}", data=png(100))
    pipeline.start()
    source.wait_acks(6)
    assert pipeline.stop(10)
    assert batches and all(source.acks.values())
    with db() as session:
        assert sorted(row.frame_id for row in session.scalars(select(Inspection))) == [f"f{i}" for i in range(6)]
        assert len(session.scalars(select(OutboxMessage)).all()) == 6


def test_redelivered_frame_gives_no_second_row_or_alert(db, tmp_path):
    source = MemorySource()
    pipeline = make_pipeline(db, tmp_path, source, ConstantDetector(0.9))
    pipeline.start()
    source.push("same", data=png(100))
    source.wait_acks(1)
    source.acks.clear()
    source.push("same", data=png(100))
    source.wait_acks(1)
    pipeline.stop(10)
    assert source.acks == {"same": True}
    with db() as session:
        assert session.scalar(select(func.count()).select_from(Inspection)) == 1
        assert session.scalar(select(func.count()).select_from(OutboxMessage)) == 1
    files = [p for p in (tmp_path / "artifacts").rglob("*") if p.is_file()]
    assert len(files) == 3  # no orphaned artifacts from the second delivery


def test_swap_detector_between_batches_drops_nothing(db, tmp_path):
    source = MemorySource()
    pipeline = make_pipeline(db, tmp_path, source, ConstantDetector(0.1, image_size=32, version="old"))
    pipeline.start()
    for i in range(20):
        source.push(f"a{i}", data=png(i))
    applied = pipeline.swap_detector(ConstantDetector(0.9, image_size=48, version="new"))
    for i in range(20):
        source.push(f"b{i}", data=png(i))
    assert applied.wait(10)
    source.wait_acks(40)
    pipeline.stop(10)
    assert all(source.acks.values()) and len(source.acks) == 40
    with db() as session:
        rows = session.scalars(select(Inspection)).all()
        assert len(rows) == 40
        assert {row.model_version for row in rows if row.frame_id.startswith("b")} == {"new"}
        for row in rows:  # each frame scored by exactly one whole model
            assert (row.model_version, row.is_anomalous) in {("old", False), ("new", True)}


def test_model_failure_hands_frames_back(db, tmp_path):
    class Broken(ConstantDetector):
        def predict(self, images, class_names=None):
            raise RuntimeError("CUDA out of memory (simulated)")

    source = MemorySource()
    pipeline = make_pipeline(db, tmp_path, source, Broken())
    pipeline.start()
    source.push("x", data=png(5))
    source.wait_acks(1)
    pipeline.stop(5)
    assert source.acks == {"x": False}
    assert pipeline.healthy()[0] is True and pipeline.failed == 1


def test_daemon_reference_path_reproduces_the_golden_scores(db, tmp_path, golden_dir):
    """Frames through the daemon (decode, resize, batched normalisation in the worker's reused buffers) score as
    the official code does on the golden inputs."""
    from model import create_detector
    from tests.model import golden

    weights, config = golden.backbone_files(golden_dir)
    detector = create_detector("anomalyclip", backbone=weights, backbone_config=config,
                               prompts=golden_dir / "prompts_official_format.pth", layers=(6, 12, 18, 24),
                               device="cpu")
    names = golden.expected_json(golden_dir)["input_files"]
    expected = golden.expected(golden_dir)["L6-12-18-24/image_scores"].numpy()
    source = MemorySource()
    pipeline = make_pipeline(db, tmp_path, source, detector, reference_preprocessing=True)
    pipeline.start()
    for index, name in enumerate(names * 2):  # twice: the second pass reuses the worker's input buffers
        source.push(f"g{index}", data=(golden_dir / name).read_bytes())
    source.wait_acks(2 * len(names), timeout=120)
    assert pipeline.stop(30)
    with db() as session:
        scores = {row.frame_id: row.score for row in session.scalars(select(Inspection))}
    for index in range(2 * len(names)):
        assert scores[f"g{index}"] == pytest.approx(float(expected[index % len(names)]), abs=1e-5), index
