"""Frame age of a live `latest` camera while a folder backlog drains, against the batch time and against the same
camera with no backlog, in the same process.

The full daemon in-process (Service: SQLite, a real folder source, artifacts, no MQTT, no HTTP) with two sources:
`cam` (a camera stand-in at --fps into a `latest` queue of [runtime].queue_size frames, as a built camera source
has) and `inbox` (a folder). First the camera runs alone for --seconds (the baseline); then --files images are
dropped into the inbox at once and the camera's frames are measured while that backlog drains. The frame age is
capture time → the row's processed time; the batch time is the median interval between two batch starts while the
model is busy. Printed: age p50/p95 in each phase, as multiples of the batch time and of the baseline, the camera's
inspected frames per second and the backlog's throughput (files/s) while draining.

    python bench/bench_live_share.py [--files 200] [--detector sleep|tiny] [--model-ms 300] [--batch 8] [--fps 5]

`--detector sleep` (default): a detector that takes --model-ms per batch (the scheduling alone; 300 ms keeps the model,
not the result writer, the bottleneck on a 2-core machine, as on a factory PC running CLIP); `tiny`: AnomalyCLIP on
the tiny golden CLIP from ../shared/golden/anomalyclip (random weights, real cost). The stage breakdown (source
queue, decode, waiting for the batch, the batch) is printed for the camera's frames in each phase.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
import torch
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.db import Inspection
from adapters.sources import build_source
from daemon.config.settings import load_config
from daemon.process.service import Service

TINY = Path(__file__).resolve().parents[2] / "shared" / "golden" / "anomalyclip"


# The live camera of the trigger bench (bench/ is on sys.path when a bench runs as a script).
from bench_trigger import Camera  # noqa: E402


@dataclass
class SleepPrediction:
    scores: torch.Tensor
    maps: torch.Tensor


class SleepDetector:
    """--model-ms per batch, whatever its size (a GPU-like model: batching is free)."""

    name = "sleep"
    version = "sleep-v1"

    def __init__(self, model_s: float, image_size: int) -> None:
        self.model_s, self.image_size = model_s, image_size
        self.device = torch.device("cpu")

    def predict(self, images: torch.Tensor, class_names=None) -> SleepPrediction:
        time.sleep(self.model_s)
        batch = images.shape[0]
        return SleepPrediction(torch.full((batch,), 0.1), torch.full((batch, self.image_size, self.image_size), 0.1))


def build_detector(args: argparse.Namespace):
    if args.detector == "sleep":
        return SleepDetector(args.model_ms / 1000, args.image_size)
    from model import create_detector

    return create_detector("anomalyclip", backbone=TINY / "tiny_clip_openai_fp16.safetensors",
                           backbone_config=TINY / "tiny-clip-24L.json",
                           prompts=TINY / "prompts_official_format.pth", image_size=args.image_size, device="cpu")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def batch_time(starts: list[float], begin: float, end: float) -> float:
    inside = [start for start in starts if begin <= start <= end]
    return statistics.median(b - a for a, b in itertools.pairwise(inside)) if len(inside) > 2 else 0.0


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="anomalyd-bench-live-"))
    inbox, staging = workdir / "inbox", workdir / "staging"
    inbox.mkdir()
    staging.mkdir()
    rng = np.random.default_rng(1)
    for index in range(args.files):  # small JPEGs, made before the clock starts
        image = rng.integers(0, 255, (args.file_px, args.file_px, 3), dtype=np.uint8)
        cv2.imwrite(str(staging / f"part-{index:05d}.jpg"), image)
    config = workdir / "config.toml"
    config.write_text(f"""
[runtime]
max_batch_size = {args.batch}
max_batch_delay_ms = 20
queue_size = {args.queue_size}
decode_threads = 2
[[sources]]
id = "inbox"
kind = "folder"
uri = "inbox"
line = "l1"
settle_s = 0
poll_interval_s = 0.1
[[sources]]
id = "cam"
kind = "camera"
line = "l1"
[mqtt]
enabled = false
[database]
url = "sqlite:///var/anomalyd.db"
[storage]
dir = "var/artifacts"
artifacts = "anomalous"
[api]
enabled = false
""")
    camera = Camera("cam", args.fps, args.queue_size)
    detector = build_detector(args)
    starts: list[float] = []  # monotonic start of each batch
    predict = detector.predict

    def timed_predict(images, class_names=None):
        starts.append(time.monotonic())
        return predict(images, class_names)

    detector.predict = timed_predict
    settings = load_config(config, environ={})
    folder = build_source(settings.sources[0].resolved(settings.base_dir), queue_size=args.queue_size)
    service = Service(settings, detector=detector, sources=[folder, camera], serve_http=False)
    service.start()
    wall_offset = time.time() - time.monotonic()
    # Where a camera frame's time goes: (phase, capture→intake, intake→decoded, decoded→its batch, the batch)
    stages: list[tuple[str, float, float, float, float]] = []
    phase = ["alone"]
    worker = service.pipeline.worker
    to_writer = worker.sink

    def sink(record) -> None:
        if record.frame.source_id == "cam":
            t = record.timings
            start = max((b for b in starts if b <= t["scored_at"]), default=t["scored_at"])
            captured = record.frame.captured_at.timestamp() - wall_offset
            stages.append((phase[0], record.t_in - captured, t["decoded_at"] - record.t_in,
                           start - t["decoded_at"], t["scored_at"] - start))
        to_writer(record)

    worker.sink = sink

    def rows(source: str) -> list[Inspection]:
        with service.sessions() as session:
            return list(session.scalars(select(Inspection).where(Inspection.source == source)))

    def camera_ages(begin: datetime, end: datetime) -> list[float]:
        return [(row.processed_at - row.captured_at).total_seconds() for row in rows("cam")
                if begin <= row.processed_at <= end]

    def report(label: str, ages: list[float], batch_s: float, seconds: float, baseline: float | None) -> float:
        p50, p95 = statistics.median(ages), percentile(ages, 95)
        versus = f"  | p50 {p50 / baseline:5.2f}x the camera alone" if baseline else ""
        print(f"{label:>22}: camera frame age p50 {p50 * 1000:7.0f} ms  p95 {p95 * 1000:7.0f} ms  "
              f"= {p50 / batch_s:4.1f} / {p95 / batch_s:4.1f} batch times ({batch_s * 1000:.0f} ms)  "
              f"camera {len(ages) / seconds:4.1f} frames/s{versus}")
        mine = [row[1:] for row in stages if row[0] == phase[0]]
        if mine:
            names = ("in its source queue", "decode", "waiting for its batch", "its batch")
            print(" " * 24 + "mean ms: " + ", ".join(f"{name} {statistics.fmean(row[i] for row in mine) * 1000:.0f}"
                                                     for i, name in enumerate(names)) + ", then the writer")
        return p50

    try:
        time.sleep(2.0)  # warm-up
        begin = datetime.now(timezone.utc)
        t0 = time.monotonic()
        time.sleep(args.seconds)
        alone = camera_ages(begin, datetime.now(timezone.utc))
        baseline = report("camera alone", alone, batch_time(starts, t0, time.monotonic()), args.seconds, None)
        phase[0] = "backlog"
        for path in sorted(staging.iterdir()):
            os.rename(path, inbox / path.name)
        deadline = time.monotonic() + args.timeout
        while len(rows("inbox")) < args.files and time.monotonic() < deadline:
            time.sleep(0.2)
        files = rows("inbox")
        if len(files) < args.files:
            raise SystemExit(f"only {len(files)} of {args.files} files inspected within {args.timeout} s")
        first, last = min(row.processed_at for row in files), max(row.processed_at for row in files)
        drain_s = (last - first).total_seconds()
        busy = batch_time(starts, first.timestamp() - wall_offset, last.timestamp() - wall_offset)
        report("during the backlog", camera_ages(first, last), busy, drain_s, baseline)
        print(f"backlog: {args.files} files drained in {drain_s:.1f} s ({args.files / drain_s:.1f} files/s); "
              f"camera frames dropped by its latest queue: {camera.counters.frames_dropped}")
    finally:
        service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=200, help="the backlog dropped into the inbox at once")
    parser.add_argument("--file-px", type=int, default=256, help="side of the backlog's JPEGs")
    parser.add_argument("--detector", default="sleep", choices=("tiny", "sleep"))
    parser.add_argument("--model-ms", type=float, default=300.0, help="--detector sleep: time per batch")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--queue-size", type=int, default=64, help="[runtime].queue_size (the default)")
    parser.add_argument("--fps", type=float, default=5.0, help="the camera's frame rate")
    parser.add_argument("--seconds", type=float, default=5.0, help="the camera alone (baseline)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--timeout", type=float, default=300.0, help="longest wait for the backlog to drain")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(args)


if __name__ == "__main__":
    main()
