"""Frames per second of `patchcore` against frame size for each resize mode (model/geometry.py).

Each size is a 3:2 frame of blurred noise; the memory bank is `--bank-rows` random rows of the model's width (the
neighbour search costs what a real bank of that size costs), so no references are needed: 16384 rows is the bank
of 16 references in every mode (16 x 1024 patches under squash; fit and tile banks are reduced to
`max_bank_rows` = 16384 by the coreset). Per (mode, size): the model inputs per frame, frames/s over `--frames`
frames (one `predict_frames` call, as a daemon batch) after one warm-up frame (`--warmup-megapixels`: of that size
instead, to save the time of a large one), the seconds per frame and the process's peak RSS so far.

    python bench/bench_geometry.py --sizes 0.3,1,5,12 --modes squash,fit,tile --frames 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.geometry import Geometry, plan_frame, predict_frames
from model.patchcore import build_patchcore


def frame(megapixels: float, seed: int = 0) -> np.ndarray:
    import cv2

    width = round((megapixels * 1e6 * 1.5) ** 0.5)
    height = round(width / 1.5)
    noise = np.random.default_rng(seed).normal(0, 1, (height, width)).astype(np.float32)
    gray = 128 + 40 * cv2.GaussianBlur(noise, (0, 0), 3) / 0.1
    return np.repeat(np.clip(gray, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (Linux: ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.3,1,5", help="megapixels, comma-separated")
    parser.add_argument("--modes", default="squash,fit,tile")
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--bank-rows", type=int, default=16384)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--warmup-megapixels", type=float, default=0.0,
                        help="warm up on a frame of this size (default: one of the measured size)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for mode in args.modes.split(","):
        detector = build_patchcore(device=args.device, geometry=Geometry(mode))
        width = detector.model.embed(torch.zeros(1, 3, 64, 64, device=detector.device)).shape[1]
        detector.model.set_memory_bank(torch.randn(args.bank_rows, width, generator=torch.Generator().manual_seed(0)))
        detector.bank = object()  # scored without references: only the speed is measured
        for megapixels in (float(v) for v in args.sizes.split(",")):
            frames = [frame(megapixels, seed) for seed in range(args.frames + 1)]
            inputs = len(plan_frame(frames[0].shape[:2], detector.geometry, detector.image_size).origins)
            warmup = frame(args.warmup_megapixels, 99) if args.warmup_megapixels else frames[0]
            predict_frames(detector, [warmup], detector.geometry)
            started = time.perf_counter()
            predict_frames(detector, frames[1:], detector.geometry)
            seconds = (time.perf_counter() - started) / args.frames
            row = {"mode": mode, "megapixels": megapixels, "frame": f"{frames[0].shape[1]}x{frames[0].shape[0]}",
                   "inputs_per_frame": inputs, "frames_per_s": round(1 / seconds, 3),
                   "seconds_per_frame": round(seconds, 3), "device": args.device, "threads": torch.get_num_threads(),
                   "bank_rows": args.bank_rows, "peak_rss_mb": round(peak_rss_mb())}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
