"""Frames/s of `patchcore` on real part frames against a full bank of the same part, PyTorch against ONNX Runtime
for the CNN trunk (adapters/cnn_runtime.py), in alternate rounds in one process (issue 24's 0.3 MP target on real
frames, not the blurred noise of bench_geometry.py).

The bank: 16 `train/good` images of a category of ../shared/data/inspection-samples (read there, never copied), 256
px, full (16384 rows). The frames: 16 of its test images (good and defective), resized to 640x480 RGB in memory and
squashed to 256 as the daemon does; two `predict_frames` calls of 8 per round, `--rounds` rounds, the median.

    python bench/real_frames_rate.py --category hazelnut --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.cnn_runtime import choose as choose_cnn_runtime
from model.fewshot import load_reference_images
from model.geometry import predict_frames
from model.patchcore import build_patchcore

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "inspection-samples"


def main() -> int:
    import cv2

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", default="hazelnut", help="one with train/good (hazelnut, cubes)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = SAMPLES / args.category
    references = sorted((root / "train" / "good").glob("*"))[:16]
    tests = sorted(p for p in (root / "test").glob("*/*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    tests = tests[:: max(1, len(tests) // 16)][:16]
    if len(references) < 16 or len(tests) < 16:
        print(f"{root}: needs 16 train/good and 16 test images")
        return 1
    detector = build_patchcore(max_bank_rows=0)
    detector.set_references(load_reference_images(references, 256))
    frames = [cv2.resize(cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB), (640, 480), interpolation=cv2.INTER_AREA)
              for p in tests]
    times: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
    with torch.inference_mode():
        for runtime in times:  # warm-up (and the ONNX export)
            choose_cnn_runtime(runtime)
            predict_frames(detector, frames[:8], detector.geometry)
        for _ in range(args.rounds):
            for runtime, seconds in times.items():
                choose_cnn_runtime(runtime)
                started = time.perf_counter()
                for start in range(0, len(frames), 8):
                    predict_frames(detector, frames[start:start + 8], detector.geometry)
                seconds.append((time.perf_counter() - started) / len(frames))
    for runtime, seconds in times.items():
        print(json.dumps({"category": args.category, "frame": "640x480", "bank_rows": int(detector.model.memory_bank.shape[0]),
                          "cnn": runtime, "frames_per_s": round(1 / float(np.median(seconds)), 1),
                          "threads": args.threads, "rounds": args.rounds, "load": round(os.getloadavg()[0], 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
