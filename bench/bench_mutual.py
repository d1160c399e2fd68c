"""Per-frame cost of the online mutual-scoring window (model/mutual/window.py) on CPU.

A frame's patches (1024 x 152 at 256 px, Lite0 taps 4+10) are scored against a full window of W frames: W chunked
nearest-neighbour searches (PatchCore's `nearest_neighbor`) and the interval average ("score"); a frame that is
admitted also pays the search of the window's patches against it and the window's leave-one-out rescoring
("score + admit", the oldest frame leaving). The bench times both per frame for several W and, in the same
process, PatchCore's search of the same frame against one bank of the same W x 1024 rows (what a PatchCore source
with W references pays): the ratios are the window's overhead. Random embeddings: the search cost does not depend
on the values; the embedding pass (the same for both models) is not included.

    python bench/bench_mutual.py --threads 1 [--windows 8,16,32,64] [--seconds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.mutual import MutualWindow, WindowLimits
from model.patchcore.torch_model import nearest_neighbor

PATCHES, DIM = 32 * 32, 152


def per_call(function, seconds: float) -> float:
    """Seconds per call over at least `seconds` (after one warm-up call)."""
    function()
    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < seconds:
        function()
        calls += 1
    return (time.perf_counter() - start) / calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--windows", default="8,16,32,64")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    frame = torch.randn(PATCHES, DIM, generator=generator)
    results = []
    for size in (int(w) for w in args.windows.split(",")):
        window = MutualWindow(WindowLimits(max_frames=size, max_bytes=1 << 34))
        for _ in range(size):
            window.offer(torch.randn(PATCHES, DIM, generator=generator), 0.0)
        bank = torch.cat(window.frames)

        def score_and_admit(w: MutualWindow = window) -> None:
            w.patch_scores(frame)
            w.offer(frame, 0.0)  # score 0: admitted; the oldest frame leaves

        mutual_s = per_call(lambda w=window: w.patch_scores(frame), args.seconds)
        admit_s = per_call(score_and_admit, args.seconds)
        patchcore_s = per_call(lambda b=bank: nearest_neighbor(frame, b), args.seconds)
        row = {"window": size, "window_mib": round(window.nbytes / 2**20, 1), "score_ms": round(1e3 * mutual_s, 1),
               "score_admit_ms": round(1e3 * admit_s, 1), "patchcore_same_rows_ms": round(1e3 * patchcore_s, 1),
               "score_ratio": round(mutual_s / patchcore_s, 2), "score_admit_ratio": round(admit_s / patchcore_s, 2)}
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
