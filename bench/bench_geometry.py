"""Frames per second of `patchcore` against frame size for each resize mode (model/geometry.py).

Each size is a 3:2 frame of blurred noise (megapixels, or WxH such as 1263x500); the memory bank holds the Lite0
features of `--references` 256 px blurred-noise references (16: 16384 rows, the full bank), built once and given to
every mode, so the exact search's certificate sees real feature statistics (`--bank random` instead: `--bank-rows`
random rows, which no candidate certificate can separate: every patch is then searched in fp32). Per (mode, size):
the model inputs per frame, frames/s over `--frames` frames
(one `predict_frames` call, as a daemon batch) after one warm-up frame (`--warmup-megapixels`: of that size
instead, to save the time of a large one), the seconds per frame and the process's peak RSS so far.

`--cnn`: the CPU runtime(s) of the CNN trunk (adapters/cnn_runtime.py), comma-separated: each (mode, size) is
measured on each in alternate rounds (`--rounds`, the median) in the same process (default: `auto`, the daemon's).

    python bench/bench_geometry.py --sizes 0.3,1,5,12,1263x500 --modes squash,fit,tile --frames 2 --threads 2
    python bench/bench_geometry.py --sizes 0.3 --modes squash --frames 8 --rounds 7 --threads 2 --cnn torch,onnxruntime
    python bench/bench_geometry.py --sizes 1263x500 --modes tile --tile-size 500 --frames 8 --threads 2
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
from model.geometry import Geometry, plan_frame, predict_frames
from model.patchcore import build_patchcore


def frame(size: str, seed: int = 0) -> np.ndarray:
    """A frame of blurred noise: `size` in megapixels (3:2) or as WxH."""
    import cv2

    if "x" in size:
        width, height = (int(v) for v in size.split("x"))
    else:
        width = round((float(size) * 1e6 * 1.5) ** 0.5)
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
    parser.add_argument("--sizes", default="0.3,1,5", help="megapixels or WxH, comma-separated")
    parser.add_argument("--modes", default="squash,fit,tile")
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="timed calls per (mode, size, runtime); the median")
    parser.add_argument("--bank", choices=("real", "random"), default="real")
    parser.add_argument("--references", type=int, default=16, help="references of the real bank (1024 rows each)")
    parser.add_argument("--bank-rows", type=int, default=16384, help="rows of the random bank")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--tile-size", type=int, default=None, help="tile mode: frame pixels per tile (default: "
                        "native resolution)")
    parser.add_argument("--cnn", default="auto", help="CNN trunk runtimes, comma-separated: auto, torch, onnxruntime")
    parser.add_argument("--warmup-megapixels", type=float, default=0.0,
                        help="warm up on a frame of this size (default: one of the measured size)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    if args.bank == "real":
        torch.manual_seed(0)
        references = torch.nn.functional.interpolate(torch.randn(args.references, 3, 32, 32), size=256,
                                                     mode="bilinear")
        builder = build_patchcore(device=args.device, max_bank_rows=0)
        builder.set_references(references)
        bank = builder.model.memory_bank.detach().clone()
    for mode in args.modes.split(","):
        detector = build_patchcore(device=args.device, geometry=Geometry(
            mode, tile_size=args.tile_size if mode == "tile" else None))
        width = detector.model.embed(torch.zeros(1, 3, 64, 64, device=detector.device)).shape[1]
        if args.bank == "random":
            bank = torch.randn(args.bank_rows, width, generator=torch.Generator().manual_seed(0))
        detector.model.set_memory_bank(bank)
        detector.bank = object()  # scored without references of this mode: only the speed is measured
        for size in args.sizes.split(","):
            frames = [frame(size, seed) for seed in range(args.frames + 1)]
            inputs = len(plan_frame(frames[0].shape[:2], detector.geometry, detector.image_size).origins)
            warmup = frame(str(args.warmup_megapixels), 99) if args.warmup_megapixels else frames[0]
            runtimes = [choose_cnn_runtime(cnn) for cnn in args.cnn.split(",")]
            times: dict[str, list[float]] = {cnn: [] for cnn in runtimes}
            for cnn in runtimes:
                choose_cnn_runtime(cnn)
                predict_frames(detector, [warmup], detector.geometry)
            for _ in range(args.rounds):  # runtimes in alternate rounds: load changes hit them alike
                for cnn in runtimes:
                    choose_cnn_runtime(cnn)
                    started = time.perf_counter()
                    predict_frames(detector, frames[1:], detector.geometry)
                    times[cnn].append((time.perf_counter() - started) / args.frames)
            for cnn in runtimes:
                seconds = float(np.median(times[cnn]))
                megapixels = round(frames[0].shape[0] * frames[0].shape[1] / 1e6, 2)
                row = {"mode": mode + (f" {args.tile_size}px" if mode == "tile" and args.tile_size else ""),
                       "megapixels": megapixels, "frame": f"{frames[0].shape[1]}x{frames[0].shape[0]}",
                       "inputs_per_frame": inputs, "cnn": cnn, "frames_per_s": round(1 / seconds, 3),
                       "seconds_per_frame": round(seconds, 3), "rounds": args.rounds, "device": args.device,
                       "threads": torch.get_num_threads(), "bank_rows": int(bank.shape[0]), "bank": args.bank,
                       "load": round(os.getloadavg()[0], 1), "peak_rss_mb": round(peak_rss_mb())}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
