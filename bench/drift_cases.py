"""Issue 23's drift measurement on the shared cubes: good cubes of one colour, then a switch (another colour, the
same colour shifted by 5 % of the frame's width, or 25 % brighter), and a defect flood (every other cube of the
same colour broken) as the control where drift must not fire. Per case: whether a drift event fired, after how
many frames of the switch, how many anomaly alerts went out between the switch and the event, and how many were
held back after it.

Two paths, each as the daemon runs it without the daemon around it:
- `mutual`: a `references = "auto"` source (`MutualDetector.predict` frame by frame, its window filled by the
  colour's good frames first);
- `patchcore`: a source on PatchCore with `--references` of those good frames (the bank, the known-good scores
  and the calibrated threshold as the daemon's reference manager builds them; the drift watch of
  daemon/detectors/drift_watch.py on its maps).
The daemon's result writer decides per frame what is alerted and what is held back (`DriftTracker.observe`).

`--floods metal_plate` adds that category's defect floods (every other plate broken, then every plate), each path
first shown `--before` good plates: metal_plate's defects leave far more of a frame unmatched than the cubes'.

The set has no colour label: frames are grouped by the dominant hue of their saturated pixels (a cube is the only
saturated object in the frame).

    python bench/drift_cases.py --threads 1 [--colour yellow] [--before 20] [--after 16] [--paths mutual,patchcore]
        [--floods metal_plate]
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import sys
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemon.detectors.drift_watch import ATTRIBUTE, with_drift_notes
from daemon.detectors.scale import scale_outputs, scaled
from daemon.references.calibration import calibrated_bounds
from daemon.zero_label.drift import DriftTracker
from model import create_detector
from model.preprocess import decode_image, fast_transform

HUES = {"red": (0, 20), "yellow": (20, 55), "green": (55, 115), "blue": (115, 190)}  # PIL hue, 0-255


def colour_of(path: Path) -> str:
    """The dominant hue of the frame's saturated pixels, named."""
    hsv = np.asarray(Image.open(path).convert("RGB").resize((160, 120)).convert("HSV")).reshape(-1, 3)
    hue = hsv[(hsv[:, 1] > 110) & (hsv[:, 2] > 60), 0].astype(int)
    if hue.size == 0:
        return "none"
    peak = int(np.bincount(hue, minlength=256).argmax())
    peak = 0 if peak >= 235 else peak  # red wraps around
    return next((name for name, (low, high) in HUES.items() if low <= peak < high), "none")


def frame(path: Path, size: int, shift: float = 0.0, gain: float = 1.0) -> torch.Tensor:
    """The daemon's input of a frame file, optionally shifted right by `shift` of its width (the left edge
    repeated, as a camera nudged sideways sees it) and/or its exposure scaled by `gain`."""
    rgb = decode_image(path)
    if shift:
        dx = max(1, round(shift * rgb.shape[1]))
        rgb = np.concatenate([np.repeat(rgb[:, :1], dx, axis=1), rgb[:, :-dx]], axis=1)
    if gain != 1.0:
        rgb = np.clip(rgb.astype(np.float32) * gain, 0, 255).astype(np.uint8)
    return fast_transform(np.ascontiguousarray(rgb), size)


Step = Callable[[torch.Tensor], tuple[float, dict[str, Any] | None, str]]  # image → (0-1 score, note, version)


def run_stream(step: Step, threshold: float, before: list[torch.Tensor], after: list[torch.Tensor]) -> dict[str, Any]:
    """Feeds `before` then `after`; what the daemon's writer would have done with each frame after the switch."""
    tracker = DriftTracker(None)
    clock = datetime(2026, 1, 1, tzinfo=timezone.utc)
    result: dict[str, Any] = {"fired": False, "frames_to_event": None, "alerts_before_event": 0,
                              "held_back": 0, "alerts_after_event": 0, "alerts_before_switch": 0, "shares": []}
    for index, image in enumerate([*before, *after]):
        score, note, version = step(image)
        clock += timedelta(seconds=10)
        in_drift = tracker.observe("cubes", "line", version, note, clock)
        decided = math.isfinite(score) and (note or {}).get("decided", True)
        would_alert = decided and score >= threshold
        switched = index >= len(before)
        if not switched:
            result["alerts_before_switch"] += int(would_alert and not in_drift)
            continue
        result["shares"].append((note or {}).get("unmatched_share"))
        if note and note.get("drift_event") and not result["fired"]:
            result["fired"], result["frames_to_event"] = True, index - len(before) + 1
        if would_alert and in_drift:
            result["held_back"] += 1
        elif would_alert:
            result["alerts_after_event" if result["fired"] else "alerts_before_event"] += 1
    return result


def mutual_path(size_frames: list[torch.Tensor]) -> tuple[Step, Callable[[], Step]]:
    """(step of a warmed-up window, a factory of copies of that warmed-up state)."""
    base = create_detector("mutual", device="cpu")

    def step_of(detector: Any) -> Step:
        def step(image: torch.Tensor) -> tuple[float, dict[str, Any] | None, str]:
            prediction = detector.predict(image[None])
            raw = float(prediction.scores[0])
            return (1.0 - math.exp(-raw) if math.isfinite(raw) else math.nan), prediction.notes[0], detector.version
        return step

    warm = base.fork()
    for image in size_frames:
        step_of(warm)(image)

    def fresh() -> Step:
        clone = warm.fork()
        bound, warm.window.image_score = warm.window.image_score, None
        try:
            clone.window, clone.drift = copy.deepcopy(warm.window), copy.deepcopy(warm.drift)
        finally:
            warm.window.image_score = bound
        clone.window.image_score, clone.grid = clone._image_scores, warm.grid
        return step_of(clone)

    return step_of(warm), fresh


def patchcore_path(references: list[Path]) -> tuple[Any, float, Callable[[], Step]]:
    """PatchCore on `references` as the daemon's reference manager builds it; (detector, threshold, step factory)."""
    from model.patchcore.known_good import patchcore_known_good

    detector = create_detector("patchcore", device="cpu", references=[str(f) for f in references])
    known = patchcore_known_good(detector, references)
    detector.known_good, detector.distance_scale = known, known.distance_scale
    scores, maxima = scale_outputs(detector, torch.tensor(known.scores), torch.tensor(known.maxima))
    threshold = calibrated_bounds(scores.tolist(), maxima.tolist(), 0.005)[0].value
    source = scaled(detector)

    def fresh() -> Step:
        if hasattr(detector, ATTRIBUTE):
            delattr(detector, ATTRIBUTE)  # a new watch: a new stream

        def step(image: torch.Tensor) -> tuple[float, dict[str, Any] | None, str]:
            prediction = with_drift_notes(source, source.predict(image[None]))
            return float(prediction.scores[0]), prediction.notes[0], detector.version
        return step

    return detector, threshold, fresh


def flood_cases(root: Path, category: str, before: int, after: int, rng: random.Random
                ) -> tuple[list[Path], list[torch.Tensor], dict[str, list[torch.Tensor]]]:
    """Another category's good frames before, then a flood of its defects: every other part, then every part."""
    good = sorted((root / "good").glob("*.*"))
    bad = sorted(p for folder in root.iterdir() if folder.name != "good" for p in folder.glob("*.*"))
    rng.shuffle(good)
    rng.shuffle(bad)
    half = [p for pair in zip(good[before:before + after // 2], bad[:after // 2], strict=False) for p in pair]
    return good[:before], [frame(f, 256) for f in good[:before]], {
        f"defect flood: every other {category} broken": [frame(f, 256) for f in half],
        f"defect flood: every {category} broken": [frame(f, 256) for f in bad[after // 2:after // 2 + after]]}


def run_cases(paths: list[str], before_files: list[Path], before: list[torch.Tensor],
              cases: dict[str, list[torch.Tensor]], n_references: int, what: str) -> list[tuple]:
    """Every case on each path, from the same state before the switch."""
    rows = []
    if "mutual" in paths:
        _, fresh = mutual_path(before)
        for name, after in cases.items():
            rows.append(("mutual (auto)", name, len(after), run_stream(fresh(), 0.5, [], after)))
            print(rows[-1], flush=True)
    if "patchcore" in paths:
        references = before_files[:n_references]
        detector, threshold, fresh = patchcore_path(references)
        print(f"patchcore on {len(references)} {what} references: threshold {threshold:.4f}, watch level "
              f"from {len(detector.known_good.maxima)} held-out maps", flush=True)
        for name, after in cases.items():
            rows.append(("patchcore (references)", name, len(after),
                         run_stream(fresh(), threshold, before[n_references:], after)))
            print(rows[-1], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/inspection-samples"))
    parser.add_argument("--colour", default="yellow", help="the line's colour before the switch")
    parser.add_argument("--before", type=int, default=20, help="good frames of the colour before the switch")
    parser.add_argument("--after", type=int, default=16, help="frames after the switch")
    parser.add_argument("--references", type=int, default=8, help="PatchCore references (of the frames before)")
    parser.add_argument("--paths", default="mutual,patchcore")
    parser.add_argument("--floods", default="metal_plate",
                        help="other categories whose defect floods (half, then all broken) are run too ('' none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = args.data / "cubes" / "test"
    good = sorted((root / "good").glob("*.jpg"))
    bad = sorted((root / "abnormal").glob("*.jpg"))
    groups: dict[tuple[str, bool], list[Path]] = {}
    for path in good + bad:
        groups.setdefault((colour_of(path), path in bad), []).append(path)
    print("frames by colour (good / defective):", {c: (len(groups.get((c, False), [])), len(groups.get((c, True), [])))
                                                  for c in HUES}, flush=True)
    rng = random.Random(args.seed)
    for paths in groups.values():
        rng.shuffle(paths)
    a_good, a_bad = groups[(args.colour, False)], groups.get((args.colour, True), [])
    before_files, held = a_good[:args.before], a_good[args.before:]
    n = min(args.after, len(held))
    size = 256
    before = [frame(f, size) for f in before_files]
    flood = [frame(f, size) for pair in zip(held, a_bad, strict=False) for f in pair][:args.after]
    cases: dict[str, list[torch.Tensor]] = {
        f"control: more good {args.colour}": [frame(f, size) for f in held[:n]],
        f"defect flood: every other {args.colour} cube broken": flood,
    }
    for colour in HUES:
        if colour != args.colour and groups.get((colour, False)):
            cases[f"colour switch: {args.colour} → {colour}"] = [frame(f, size) for f in
                                                                  groups[(colour, False)][:args.after]]
    cases["camera shifted by 5 % of the width"] = [frame(f, size, shift=0.05) for f in held[:n]]
    cases["exposure 25 % brighter"] = [frame(f, size, gain=1.25) for f in held[:n]]
    paths = args.paths.split(",")
    rows = run_cases(paths, before_files, before, cases, args.references, args.colour)
    for category in filter(None, args.floods.split(",")):
        rows += run_cases(paths, *flood_cases(args.data / category / "test", category, args.before, 24, rng),
                          args.references, category)
    print("\n| path | case | frames after the switch | drift fired | at frame | alerts before it | held back | "
          "alerts after it | unmatched share, median |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path, name, count, r in rows:
        shares = [s for s in r["shares"] if s is not None]
        median = f"{100 * float(np.median(shares)):.0f} %" if shares else "—"
        print(f"| {path} | {name} | {count} | {'yes' if r['fired'] else 'no'} | {r['frames_to_event'] or '—'} | "
              f"{r['alerts_before_event']} | {r['held_back']} | {r['alerts_after_event']} | {median} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
