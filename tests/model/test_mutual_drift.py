"""Drift watch on real frames and real weights (model/drift.py through the online `mutual` detector): a flood
of real defects (every other cube broken) raises alerts and no drift; a change of the line (another product,
metal plates, on the camera) is signalled once, within a few frames, while its frames are kept out of the window."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from model import create_detector
from model.dataset_loading import load_image
from model.datasets import discover

pytestmark = [pytest.mark.shared, pytest.mark.slow]


def frames(samples_dir: Path, category: str, label: int, count: int) -> list[Path]:
    paths = sorted(s.path for s in discover(samples_dir, split="test") if s.category == category and s.label == label)
    return paths[::max(1, len(paths) // count)][:count]


def test_defect_flood_alerts_without_drift_and_a_line_change_drifts_once(samples_dir: Path, caplog) -> None:
    detector = create_detector("mutual", device="cpu", window_frames=16)
    detector.label = "source line1"
    good = frames(samples_dir, "cubes", 0, 22)
    broken = frames(samples_dir, "cubes", 1, 10)

    notes: list[dict] = []

    def feed(paths: list[Path]) -> list[float]:
        images = torch.stack([load_image(p, detector.image_size, "fast") for p in paths])
        prediction = detector.predict(images)
        notes.extend(prediction.notes)
        return [1.0 - math.exp(-float(s)) for s in prediction.scores]  # the daemon's 0-1 scale

    cold = feed(good[:10])  # cold start: the frames that fill the window get no decision (NaN), never a pass
    assert detector.window.ready
    undecided = [math.isnan(s) for s in cold]
    assert undecided[:8] == [True] * 8 and [not n["decided"] for n in notes] == undecided
    flood = [p for pair in zip(good[10:20], broken, strict=True) for p in pair]
    scores = feed(flood)
    alerted = [s >= 0.5 for s in scores]
    assert sum(alerted[1::2]) >= 8, scores  # the broken plates are alerted ...
    assert sum(alerted[0::2]) <= 1, scores
    assert detector.drift.events == [], detector.drift.events  # ... and the flood is not taken for a drift
    excluded = detector.window.excluded
    switched = frames(samples_dir, "metal_plate", 0, 8)
    scores = feed(switched)
    assert all(s >= 0.5 for s in scores), scores  # every frame of the new product looks anomalous ...
    assert len(detector.drift.events) == 1, detector.drift.events  # ... and one drift names where it began
    event = detector.drift.events[0]
    signalled = [n for n in notes if "drift_event" in n]  # the daemon learns it from the frame's notes
    assert len(signalled) == 1 and signalled[0]["drift_event"]["frame"] == event.frame
    assert signalled[0]["drifting"] and signalled[0]["drift_index"] == event.detected_at
    print(f"drift: {event}; new-product scores {[round(s, 2) for s in scores]}")
    first = detector.drift.frames - len(switched)
    # the excursion starts at the first plate, or at the broken cube before it when that one was alerted with
    # more of its patches unmatched than the watch's allowance (a defect's share can reach a variant's)
    assert first - 1 <= event.frame <= first and event.detected_at <= first + 5 and event.share > 0.6
    assert detector.window.excluded == excluded + len(switched)  # the new product did not enter the window
    said = [r.getMessage() for r in caplog.records if "drift" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("source line1: drift") and f"since frame {event.frame} " in said[0]
