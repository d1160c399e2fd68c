"""The online mutual detector fed a category's test frames shuffled, from a cold start (no references, no labels):
alerts among the defective and the good frames over the first 50, 100 and all frames, on the daemon's 0-1 scale
(1 - exp(-score), alert at the default threshold 0.5), and of those the alerts the daemon would hold back because
the drift watch was in drift. The same path as a `references = "auto"` source
(`MutualDetector.predict` frame by frame), without the daemon around it.

    python bench/stream_mutual.py --threads 1 --category cubes --seed 0 [--admit-ratio 1.2]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import create_detector
from model.dataset_loading import load_image
from model.datasets import discover


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/inspection-samples"))
    parser.add_argument("--category", default="cubes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--admit-ratio", type=float, help="the window's admission ratio (default: the window's)")
    parser.add_argument("--frames", type=int, default=0, help="only the first N shuffled frames (0: all)")
    parser.add_argument("--dump", type=Path, help="a JSON file of every frame's score, label and window state")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    samples = sorted((s for s in discover(args.data, split="test") if s.category == args.category),
                     key=lambda s: str(s.path))
    random.Random(args.seed).shuffle(samples)
    if args.frames:
        samples = samples[:args.frames]
    dumped: list[dict] = []
    detector = create_detector("mutual", device="cpu")
    if args.admit_ratio:
        detector.admit_ratio = detector.window.admit_ratio = args.admit_ratio
    counts = {"defective": 0, "defective alerted": 0, "good": 0, "good alerted": 0, "defective held back (drift)": 0,
              "good held back (drift)": 0}
    for index, sample in enumerate(samples, start=1):
        prediction = detector.predict(load_image(sample.path, detector.image_size, "fast")[None])
        score, note = float(prediction.scores[0]), prediction.notes[0]
        alerted = 1.0 - math.exp(-score) >= 0.5
        kind = "defective" if sample.label else "good"
        counts[kind] += 1
        counts[f"{kind} alerted"] += int(alerted)
        # the daemon records an alert during a drift with no decision and sends none (daemon/zero_label/drift.py)
        counts[f"{kind} held back (drift)"] += int(alerted and bool(note.get("drifting")))
        dumped.append({"frame": sample.path.name, "label": int(sample.label), "score": 1.0 - math.exp(-score),
                       "window": len(detector.window), "level": detector.window.normal_level()})
        if index in (50, 100, len(samples)):
            print(f"{args.category} seed {args.seed}, first {index} frames: {counts}; window {len(detector.window)} "
                  f"frames, {detector.window.excluded} kept out, drift events {len(detector.drift.events)}",
                  flush=True)
    if args.dump:
        import json

        args.dump.write_text(json.dumps(dumped) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
