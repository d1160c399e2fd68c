"""JPEG decoding on the hot path: `model.preprocess.decode_image` (header checks, then libjpeg-turbo through
simplejpeg in strict mode, which fails damaged JPEGs) against a bare OpenCV `imdecode` (which ignores libjpeg's
corrupt-data warnings), on the same sample JPEGs in the same process. Prints ms/frame for each and the ratio.

    python bench/bench_decode.py                      # 200 JPEGs of ../shared/data/inspection-samples, 3 rounds
    python bench/bench_decode.py --count 500 --rounds 5
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np

from model.preprocess import decode_image

SAMPLES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "inspection-samples"


def opencv_decode(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)


def per_frame_ms(decode, datas: list[bytes]) -> float:
    started = time.perf_counter()
    for data in datas:
        decode(data)
    return (time.perf_counter() - started) / len(datas) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    datas = [path.read_bytes() for path in sorted(SAMPLES.rglob("*.jpg"))[: args.count]]
    if not datas:
        raise SystemExit(f"no JPEG under {SAMPLES}")
    baseline, strict = [], []
    for _ in range(args.rounds):  # interleaved, so machine load affects both alike
        baseline.append(per_frame_ms(opencv_decode, datas))
        strict.append(per_frame_ms(decode_image, datas))
    best_base, best_strict = min(baseline), min(strict)
    print(f"{len(datas)} JPEGs: OpenCV imdecode {best_base:.3f} ms/frame, decode_image (strict) "
          f"{best_strict:.3f} ms/frame, ratio {best_strict / best_base:.2f}")


if __name__ == "__main__":
    main()
