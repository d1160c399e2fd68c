"""Pipeline throughput and latency with a constant-output detector (no model cost): where does the time go?

Phase 1 (throughput): N 640x480 JPEGs already in a folder inbox, the full daemon (Service: folder source,
SQLite, artifacts, MQTT to a local Mosquitto when one is installed) runs until all are committed; frames/s.
Phase 2 (latency): frames fed at a steady rate (half the measured throughput) into the pipeline; p50/p99 from
the frame's creation to its committed row. 10% of the frames are anomalous (alerts through the outbox).

    python bench/bench_pipeline.py [--frames 1000] [--image-size 518] [--batch 8]
    python bench/bench_pipeline.py --detector tiny --frames 160 --batch 16   # (b): the tiny CLIP from ../shared
    python bench/bench_pipeline.py --detector patchcore --frames 200 --image-size 256   # real Lite0, full bank
    python bench/bench_pipeline.py --source redis      # frames from a Redis Stream consumer group instead
    python bench/bench_pipeline.py --artifacts anomalous --stage-costs   # mask/heatmap only for anomalous frames;
                                                       # first the single-thread cost of each step
    python bench/bench_pipeline.py --content noise     # noise frames (JPEG's worst case) instead of sample photos

With `--detector tiny` or `patchcore` the model's own time on the same frames (preprocessed tensors, batches of --batch, no
pipeline) is measured in the same process before and after the pipeline run, and the pipeline's overhead is
reported against the mean of the two (this machine's speed drifts by several percent within minutes).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.sources.base import Frame, FrameQueue, SourceCounters, SourceStatus
from daemon.config.settings import load_config
from daemon.process.service import Service


@dataclass
class _Prediction:
    scores: torch.Tensor
    maps: torch.Tensor


class MarkerDetector:
    """Constant output, except frames whose top-left pixel is bright (10% of them) score 0.9."""

    name = "constant"
    version = "bench"

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size
        self.device = torch.device("cpu")

    def predict(self, images: torch.Tensor, class_names=None) -> _Prediction:
        flagged = images[:, 0, 0, 0] > 1.0
        scores = torch.where(flagged, 0.9, 0.1).float()
        maps = torch.full((images.shape[0], self.image_size, self.image_size), 0.1)
        maps[flagged, : self.image_size // 8, : self.image_size // 8] = 0.9
        return _Prediction(scores, maps)


TINY = Path(__file__).resolve().parents[2] / "shared" / "golden" / "anomalyclip"


def tiny_detector(image_size: int):
    """AnomalyCLIP on the tiny golden CLIP with the golden prompts (random weights: the cost is real)."""
    from model import create_detector

    return create_detector("anomalyclip", backbone=TINY / "tiny_clip_openai_fp16.safetensors",
                           backbone_config=TINY / "tiny-clip-24L.json",
                           prompts=TINY / "prompts_official_format.pth", image_size=image_size, device="cpu")


def patchcore_detector(references: int = 16):
    """PatchCore on the real EfficientNet-Lite0 weights with a full bank of `references` good hazelnut images from
    ../shared (16: 16384 rows), scored with the daemon's exact search."""
    from model import create_detector

    good = sorted((SAMPLES / "hazelnut" / "train" / "good").glob("*"))[:references]
    return create_detector("patchcore", references=[str(path) for path in good], device="cpu")


def model_only_seconds(detector, jpegs: list[bytes], batch: int) -> float:
    """The model's own time for these frames: preprocessed tensors in batches, no pipeline around it."""
    from model.preprocess import decode_image, fast_transform

    tensors = [fast_transform(decode_image(data), detector.image_size) for data in jpegs]
    detector.predict(torch.stack(tensors[:batch]))  # warm-up
    started = time.monotonic()
    for index in range(0, len(tensors), batch):
        detector.predict(torch.stack(tensors[index : index + batch]))
    return time.monotonic() - started


SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "inspection-samples"


def sample_images(limit: int = 40) -> list[np.ndarray]:
    """Inspection-sample photos (not their masks) resized to 640x480 BGR, read from ../shared, never copied."""
    paths = sorted(path for path in SAMPLES.rglob("*") if path.suffix.lower() in (".png", ".jpg", ".jpeg")
                   and "ground_truth" not in path.parts and not path.stem.endswith("_mask"))
    step = max(1, len(paths) // limit)
    images = [cv2.imread(str(path), cv2.IMREAD_COLOR) for path in paths[::step][:limit]]
    return [cv2.resize(image, (640, 480), interpolation=cv2.INTER_AREA) for image in images if image is not None]


def make_jpegs(count: int, rng: np.random.Generator, content: str = "noise") -> list[bytes]:
    """640x480 JPEGs (quality 90); every 10th has a white top-left square (the marker detector's anomaly).

    `noise`: uniform noise, the worst case for JPEG (about 200 kB a frame, 2.4 ms to decode here); `samples`:
    photos of the inspection samples, like real camera frames (about 50 kB, under 1 ms to decode)."""
    bases = sample_images() if content == "samples" else [(rng.random((480, 640, 3)) * 120).astype(np.uint8)]
    if not bases:
        raise SystemExit(f"no sample images under {SAMPLES}: use --content noise")
    frames = []
    for index in range(count):
        image = np.roll(bases[index % len(bases)], index * 7, axis=1)
        image[:16, :16] = 255 if index % 10 == 0 else 0
        _ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        frames.append(jpeg.tobytes())
    return frames


def source_text(args, redis_url: str | None) -> str:
    if args.source == "redis":
        return f"""[[sources]]
id = "bench"
kind = "redis"
threshold = 0.5
block_ms = 50
[redis]
url = "{redis_url}"
stream = "bench:frames"
group = "bench"
"""
    return """[[sources]]
id = "bench"
kind = "folder"
uri = "inbox"
threshold = 0.5
settle_s = 0.0
poll_interval_s = 0.05
after = "delete"
"""


def config_text(root: Path, args, mqtt_port: int | None, redis_url: str | None = None) -> str:
    mqtt = f'host = "127.0.0.1"\nport = {mqtt_port}' if mqtt_port else "enabled = false"
    # patchcore: the daemon builds and calibrates the bank itself, as on a line (its time is start-up)
    model = (f'[model]\nname = "patchcore"\nreferences = "{SAMPLES / "hazelnut" / "train" / "good"}"\n'
             if args.detector == "patchcore" else "")
    return f"""{model}
[runtime]
max_batch_size = {args.batch}
max_batch_delay_ms = 10
queue_size = 64
decode_threads = {args.decode_threads}
persist_threads = {args.persist_threads}
{source_text(args, redis_url)}
[mqtt]
{mqtt}
[database]
url = "sqlite:///var/bench.db"
[storage]
dir = "var/artifacts"
artifacts = "{args.artifacts}"
[api]
enabled = false
"""


class _PacedSource:
    kind = "memory"

    def __init__(self) -> None:
        self.id, self.line, self.class_name, self.threshold = "paced", "bench", None, 0.5
        self.counters = SourceCounters()
        self.queue = FrameQueue(10_000, "all", self.counters)
        self.status = SourceStatus.ONLINE
        self.on_status = None

    def start(self) -> None: ...

    def stop(self, timeout: float = 5.0) -> None: ...


def single_thread_costs(jpegs: list[bytes], image_size: int, threshold: float = 0.5) -> dict[str, float]:
    """Milliseconds per frame of each step, one thread, nothing else running: the CPU floor of a frame."""
    from adapters.storage import ArtifactStore
    from daemon.frames.results import extract_regions, map_to_frame
    from model.preprocess import decode_image, fast_transform

    seconds: dict[str, float] = {}
    model_map = np.full((image_size, image_size), 0.1, np.float32)
    model_map[: image_size // 8, : image_size // 8] = 0.9
    with tempfile.TemporaryDirectory() as tmp:
        store = ArtifactStore(tmp)
        for index, data in enumerate(jpegs):
            marks = [("start", time.perf_counter())]
            rgb = decode_image(data)
            marks.append(("decode", time.perf_counter()))
            fast_transform(rgb, image_size)
            marks.append(("resize + normalise", time.perf_counter()))
            frame_map = map_to_frame(model_map, rgb.shape[1], rgb.shape[0])
            mask, _regions = extract_regions(frame_map, threshold)
            marks.append(("map + regions", time.perf_counter()))
            store.write(f"f{index}", datetime.now(timezone.utc), rgb=rgb, anomaly_map=frame_map, mask=mask,
                        frame_bytes=data)
            marks.append(("artifacts (mask, heatmap, frame)", time.perf_counter()))
            for (_, before), (stage, after) in itertools.pairwise(marks):
                seconds[stage] = seconds.get(stage, 0.0) + after - before
    return {stage: 1000 * total / len(jpegs) for stage, total in seconds.items()}


def report_stages(pipeline, wall: float, frames: int) -> None:
    print("  where the time goes (seconds summed over threads, per frame):")
    for stage, (seconds, count) in sorted(pipeline.stage_times.snapshot().items()):
        print(f"    {stage:12s} {1000 * seconds / max(count, 1):7.2f} ms/frame   total {seconds:7.2f} s")
    print(f"    model worker {pipeline.worker.batches} batches, mean size {frames / max(pipeline.worker.batches, 1):.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--decode-threads", type=int, default=2)
    parser.add_argument("--persist-threads", type=int, default=2)
    parser.add_argument("--no-mqtt", action="store_true")
    parser.add_argument("--artifacts", choices=("all", "anomalous"), default="all",
                        help="[storage].artifacts: mask + heatmap for every frame, or for anomalous ones only")
    parser.add_argument("--source", choices=("folder", "redis"), default="folder",
                        help="where the frames come from (redis: a local redis-server, frames XADDed beforehand)")
    parser.add_argument("--stage-costs", action="store_true",
                        help="first time each step on one thread (the CPU floor of a frame)")
    parser.add_argument("--content", choices=("samples", "noise"), default=None,
                        help="frame content: inspection-sample photos (default when ../shared is there) or "
                             "uniform noise (the worst case for JPEG size and decoding)")
    parser.add_argument("--detector", choices=("constant", "tiny", "patchcore"), default="constant",
                        help="constant: the pipeline's own cost; tiny: the tiny CLIP, patchcore: the real Lite0 "
                             "weights on a full 16-reference bank, to see what the pipeline adds")
    args = parser.parse_args()
    from adapters.cnn_runtime import choose as choose_cnn_runtime

    # the daemon's CPU runtime of the CNN trunk for the model-alone timings too ([runtime].cnn's default)
    choose_cnn_runtime("auto")
    logging.basicConfig(level=logging.WARNING)
    rng = np.random.default_rng(0)
    content = args.content or ("samples" if SAMPLES.is_dir() else "noise")
    jpegs = make_jpegs(args.frames, rng, content)
    print(f"frames: {args.frames} x 640x480 JPEG of {content}, mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f} kB")
    if args.stage_costs:
        costs = single_thread_costs(jpegs[:200], args.image_size)
        print("single-thread cost per frame: " + ", ".join(f"{stage} {ms:.2f} ms" for stage, ms in costs.items())
              + f"; total {sum(costs.values()):.2f} ms")
    model_seconds = None
    if args.detector in ("tiny", "patchcore"):
        built = tiny_detector(args.image_size) if args.detector == "tiny" else patchcore_detector()
        make_detector = lambda: built  # noqa: E731
        model_seconds = model_only_seconds(make_detector(), jpegs, args.batch)
        print(f"model alone: {args.frames} frames in {model_seconds:.2f} s "
              f"({args.frames / model_seconds:.1f} frames/s, batch {args.batch})")
    else:
        torch.set_num_threads(1)  # the constant detector needs no torch threads: leave the cores to the pipeline
        make_detector = lambda: MarkerDetector(args.image_size)  # noqa: E731
    broker = None
    if not args.no_mqtt:
        try:
            from tests.services import Mosquitto

            broker = Mosquitto()
            broker.start()
        except Exception as exc:  # no broker: the outbox keeps the alerts
            print(f"(no MQTT broker: {exc})")
            broker = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            (root / "inbox").mkdir()
            redis_server = None
            if args.source == "redis":
                from adapters.sources.redis_stream import RedisFrameWriter
                from tests.services import Redis

                redis_server = Redis()
                redis_server.start()
                writer = RedisFrameWriter(redis_server.url, "bench:frames")
                for index, data in enumerate(jpegs):
                    writer.append(data, frame_id=f"bench-{index}", source="bench", line="bench",
                                  content_type="image/jpeg")
            else:
                for index, data in enumerate(jpegs):
                    (root / "inbox" / f"{index:06d}.jpg").write_bytes(data)
            (root / "config.toml").write_text(config_text(root, args, broker.port if broker else None,
                                                          redis_server.url if redis_server else None))
            settings = load_config(root / "config.toml", environ={})
            service = Service(settings, detector=None if args.detector == "patchcore" else make_detector())
            started = time.monotonic()
            service.start()
            first_done = None
            while service.pipeline.processed + service.pipeline.rejected < args.frames:
                if first_done is None and service.pipeline.processed:
                    first_done = (time.monotonic(), service.pipeline.processed)
                time.sleep(0.01)
            wall = time.monotonic() - started
            if first_done is not None and time.monotonic() > first_done[0]:
                steady = (args.frames - first_done[1]) / (time.monotonic() - first_done[0])
                print(f"steady state (first committed row to last): {steady:.1f} frames/s")
            flushed_at = time.monotonic()
            if service.publisher is not None:
                service.publisher.flush(60)
            publish_wait = time.monotonic() - flushed_at
            throughput = args.frames / wall
            print(f"throughput ({args.source} source): {args.frames} frames 640x480 JPEG, model input {args.image_size}px, batch {args.batch}: "
                  f"{wall:.2f} s, {throughput:.1f} frames/s (incl. start-up); outbox flushed {publish_wait:.2f} s later")
            report_stages(service.pipeline, wall, args.frames)
            service.stop()
            if model_seconds is not None:
                # The model alone again, after the pipeline: this machine's speed drifts, and the mean of the
                # two keeps a drift from reading as pipeline overhead.
                after = model_only_seconds(make_detector() if args.detector == "patchcore" else service.pipeline.detector,
                                           jpegs, args.batch)
                print(f"model alone, after the pipeline run: {after:.2f} s")
                mean = (model_seconds + after) / 2
                print(f"  pipeline adds {100 * (wall / mean - 1):.1f}% over the model's own time "
                      f"({wall:.2f} s vs {mean:.2f} s, the mean of the runs before and after; start-up included)")
                # Split in two, both from this run alone: wall time outside the model's batches (start-up, decoding
                # the first batch, writing the last), and the batches' own slowdown next to the pipeline's threads
                # (on a CPU, a helper thread taking a core stalls the model's intra-op threads).
                inside = service.pipeline.stage_times.snapshot().get("model", (0.0, 0))[0]
                print(f"  of which outside the model's batches: {wall - inside:.2f} s ({100 * (wall - inside) / mean:.1f}%);"
                      f" the batches themselves: {inside:.2f} s, {100 * (inside / mean - 1):+.1f}% against the model alone")
            if redis_server is not None:
                redis_server.close()
            if model_seconds is not None or redis_server is not None:
                return 0  # the steady-rate latency phase below feeds frames in memory: once, from the folder run

            # Phase 2: steady rate, latency from frame creation to committed row.
            rate = max(1.0, throughput * 0.5)
            count = min(args.frames, int(rate * 5))
            (root / "paced").mkdir()
            settings = load_config(root / "config.toml", environ={}, overrides={
                "sources": [], "database": {"url": "sqlite:///var/paced.db"}, "mqtt": {"enabled": False}})
            source = _PacedSource()
            service = Service(settings, detector=MarkerDetector(args.image_size), sources=[source])
            service.start()
            latencies: list[float] = []
            lock = threading.Lock()
            created: dict[str, float] = {}

            def on_result(row, _created) -> None:
                with lock:
                    latencies.append(time.monotonic() - created[row.frame_id])

            service.pipeline.on_result = on_result
            next_at = time.monotonic()
            for index in range(count):
                frame_id = f"paced-{index}"
                created[frame_id] = time.monotonic()
                source.queue.put(Frame(frame_id=frame_id, source_id="paced", captured_at=datetime.now(timezone.utc),
                                       data=jpegs[index % len(jpegs)], name=frame_id, meta={"line": "bench"}))
                next_at += 1.0 / rate
                time.sleep(max(0.0, next_at - time.monotonic()))
            while len(latencies) < count:
                time.sleep(0.01)
            service.stop()
            p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
            print(f"latency at {rate:.0f} frames/s ({count} frames): p50 {p50:.1f} ms, p99 {p99:.1f} ms "
                  "(frame created → row committed)")
    finally:
        if broker is not None:
            broker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
