"""Trigger → answer latency of a triggered source while a free-running source keeps the model worker busy.

The full daemon in-process (Service: SQLite, artifacts, no MQTT) with two sources: `press` (a camera stand-in at
--fps, `trigger = "opcua"`) and `belt` (free-running, a backlog of frames refilled so the worker never idles).
Triggers are issued one after another (each waits for its answer); the latency is from the trigger to the
committed answer. Each answer is split into: waiting for the fresh frame, decode, queueing (waiting for the
worker: the free-running batch in flight), the model, and the rest (post-processing, artifacts, commit).
The same triggers without the free-running load are measured first, in the same process, as the baseline.

    python bench/bench_trigger.py [--triggers 30] [--threads 2] [--detector tiny|patchcore] [--image-size 224]

`--detector tiny`: AnomalyCLIP on the tiny golden CLIP from ../shared/golden/anomalyclip (random weights, real
cost). `patchcore` when that model family is on this branch (it needs references; not wired here yet).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.sources.base import Frame, FrameQueue, SourceCounters, SourceStatus
from daemon.config.settings import load_config
from daemon.process.service import Service

TINY = Path(__file__).resolve().parents[2] / "shared" / "golden" / "anomalyclip"


class Camera:
    """A live source: a frame every 1/fps s into a `latest` queue (the newest kept, the oldest dropped)."""

    kind = "camera"

    def __init__(self, source_id: str, fps: float, queue_size: int = 2, shape=(480, 640, 3)) -> None:
        self.id, self.line, self.class_name, self.threshold = source_id, "l1", None, 0.5
        self.fps = fps
        self.counters = SourceCounters()
        self.queue = FrameQueue(queue_size, "latest", self.counters)
        self.status = SourceStatus.ONLINE
        self.on_status = None
        self.last_error = None
        self._stop = threading.Event()
        rng = np.random.default_rng(0)
        self.image = rng.integers(0, 255, shape, dtype=np.uint8)

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(1 / self.fps):
            n += 1
            self.queue.put(Frame(frame_id=f"{self.id}-{time.time_ns()}-{n}", source_id=self.id,
                                 captured_at=datetime.now(timezone.utc), image=self.image, meta={"line": self.line}))

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.status = SourceStatus.OFFLINE


class Backlog(Camera):
    """The free-running load: keeps `depth` frames queued (policy all) while `loaded` is set."""

    def __init__(self, source_id: str, depth: int = 16) -> None:
        super().__init__(source_id, fps=200)
        self.queue = FrameQueue(depth, "all", self.counters)
        self.loaded = threading.Event()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            if not self.loaded.wait(0.05):
                continue
            n += 1
            self.queue.put(Frame(frame_id=f"{self.id}-{time.time_ns()}-{n}", source_id=self.id,
                                 captured_at=datetime.now(timezone.utc), image=self.image,
                                 meta={"line": self.line}), timeout=0.2)


def build_detector(kind: str, image_size: int):
    from model import create_detector

    if kind == "tiny":
        return create_detector("anomalyclip", backbone=TINY / "tiny_clip_openai_fp16.safetensors",
                               backbone_config=TINY / "tiny-clip-24L.json",
                               prompts=TINY / "prompts_official_format.pth", image_size=image_size, device="cpu")
    raise SystemExit(f"--detector {kind}: not available on this branch (use tiny)")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="anomalyd-bench-trigger-"))
    config = workdir / "config.toml"
    config.write_text(f"""
[runtime]
max_batch_size = {args.batch}
max_batch_delay_ms = 20
decode_threads = 2
[[sources]]
id = "press"
kind = "camera"
line = "l1"
trigger = "opcua"
deadline_ms = 60000
[[sources]]
id = "belt"
kind = "folder"
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
    press, belt = Camera("press", args.fps), Backlog("belt")
    detector = build_detector(args.detector, args.image_size)
    service = Service(load_config(config, environ={}), detector=detector, sources=[press, belt], serve_http=False)
    service.start()
    answers: dict[str, threading.Event] = {}
    timings: dict[str, dict[str, float]] = {}
    integrations = service.integrations
    original_answer = integrations.triggers.on_answer

    def on_answer(answer) -> None:
        original_answer(answer)
        timings.setdefault(answer.request.id, {})["answer"] = answer.latency_s
        answers.setdefault(answer.request.id, threading.Event()).set()

    integrations.triggers.on_answer = on_answer
    worker = service.pipeline.worker
    original_sink = worker.sink

    def sink(scored) -> None:
        trigger_id = scored.prepared.frame.meta.get("trigger_id")
        if trigger_id:
            t = scored.prepared.timings
            batch_start = t["scored_at"] - t["model_s"]
            timings.setdefault(trigger_id, {}).update(
                t_in=scored.prepared.t_in, decoded=t["decoded_at"], start=batch_start, scored=t["scored_at"])
        original_sink(scored)

    worker.sink = sink

    def measure(label: str, count: int) -> tuple[float, float, float]:
        results = []
        for index in range(count):
            t0 = time.monotonic()
            trigger_id = integrations.trigger("press", f"{label}-{index}", "opcua")
            event = answers.setdefault(trigger_id, threading.Event())
            if not event.wait(120):
                raise SystemExit(f"trigger {index} got no answer")
            t = timings[trigger_id]
            results.append({"total": t["answer"], "frame_wait": t["t_in"] - t0, "decode": t["decoded"] - t["t_in"],
                            "queue": t["start"] - t["decoded"], "model": t["scored"] - t["start"]})
            time.sleep(args.gap)
        totals = [r["total"] * 1000 for r in results]
        shares = {k: statistics.fmean(r[k] for r in results) / statistics.fmean(r["total"] for r in results)
                  for k in ("frame_wait", "decode", "queue", "model")}
        shares["rest"] = 1 - sum(shares.values())
        print(f"{label:>12}: p50 {percentile(totals, 50):7.1f} ms  p99 {percentile(totals, 99):7.1f} ms  "
              f"mean {statistics.fmean(totals):7.1f} ms  | shares: " +
              "  ".join(f"{k} {v * 100:4.1f}%" for k, v in shares.items()))
        return statistics.fmean(totals), percentile(totals, 50), percentile(totals, 99)

    try:
        measure("warm-up", 3)
        idle = measure("idle worker", args.triggers)
        belt.loaded.set()
        time.sleep(2.0)
        processed_before = service.pipeline.processed
        started = time.monotonic()
        loaded = measure("loaded", args.triggers)
        rate = (service.pipeline.processed - processed_before) / (time.monotonic() - started)
        belt.loaded.clear()
        print(f"free-running throughput while triggering: {rate:.1f} frames/s; "
              f"loaded/idle p50 {loaded[1] / idle[1]:.2f}x, p99 {loaded[2] / idle[2]:.2f}x")
    finally:
        service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triggers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the issue's 2 CPU cores)")
    parser.add_argument("--detector", default="tiny", choices=("tiny", "patchcore"))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8, help="max_batch_size of the free-running batches")
    parser.add_argument("--fps", type=float, default=30.0, help="the triggered camera's frame rate")
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between an answer and the next trigger")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(args)


if __name__ == "__main__":
    main()
