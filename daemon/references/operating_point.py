"""`anomalyd eval --shots K`'s operating point: the false-reject and miss rates on the test set at the threshold
the daemon's own rule derives from the K references alone (daemon/references/manager.py + daemon/references/calibration.py).

Per category: the known-good scores of the references from the family's `known_good` hook (PatchCore's:
leave-one-out and calibration views, model/patchcore/known_good.py), on the daemon's 0–1 scale with the d0 they
give, through `calibrated_bounds` at the target rate; the test images' scores on the same scale; alert = score >=
threshold. Families without that hook are calibrated by the daemon with leave-one-out banks of the few-shot wrapper,
which eval does not rebuild: their operating point is reported as n/a.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def daemon_threshold(detector: Any, reference_files: Sequence[Path], rate: float
                     ) -> tuple[float, str, list[float]] | None:
    """(threshold on the daemon's scale, rule, the known-good scores it came from) the daemon would set for these
    references; sets the detector's `distance_scale` (d0) as the daemon does. None for a family eval cannot
    calibrate so."""
    import torch

    from daemon.detectors.scale import scale_outputs
    from daemon.references.calibration import calibrated_bounds, floored
    from model.factory import capabilities_of, known_good_of
    from model.known_good import CALIBRATION_HOLDOUTS

    known_good = known_good_of(detector)  # the family's hook (PatchCore: model/patchcore/known_good.py)
    if known_good is None or len(reference_files) < 2:
        return None
    known = known_good(detector, list(reference_files), CALIBRATION_HOLDOUTS)
    detector.distance_scale = known.distance_scale
    scores, maxima = scale_outputs(detector, torch.tensor(known.scores), torch.tensor(known.maxima))
    image, _ = calibrated_bounds(scores.tolist(), maxima.tolist(), rate)
    image = floored(image, capabilities_of(detector).threshold_floor)  # e.g. a head's decision boundary
    return image.value, image.rule, scores.tolist()


def on_daemon_scale(detector: Any, raw_scores: Sequence[float]) -> list[float]:
    import torch

    from daemon.detectors.scale import scale_outputs

    values = torch.tensor(list(raw_scores), dtype=torch.float32)
    return scale_outputs(detector, values, values)[0].tolist()


def operating_point(threshold: float, scores: Sequence[float], labels: Sequence[int]) -> dict[str, Any]:
    """False rejects among the normals and misses among the anomalies at `threshold` (alert = score >= it)."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels, int)
    normals, anomalies = int((y == 0).sum()), int((y == 1).sum())
    false_rejects = int(((s >= threshold) & (y == 0)).sum())
    misses = int(((s < threshold) & (y == 1)).sum())
    return {"threshold": float(threshold), "normals": normals, "false_rejects": false_rejects,
            "frr": false_rejects / normals if normals else None, "anomalies": anomalies, "missed": misses,
            "miss_rate": misses / anomalies if anomalies else None}


def pooled(points: dict[str, dict[str, Any]]) -> dict[str, Any]:
    normals = sum(p["normals"] for p in points.values())
    anomalies = sum(p["anomalies"] for p in points.values())
    false_rejects = sum(p["false_rejects"] for p in points.values())
    missed = sum(p["missed"] for p in points.values())
    return {"normals": normals, "false_rejects": false_rejects, "frr": false_rejects / normals if normals else None,
            "anomalies": anomalies, "missed": missed, "miss_rate": missed / anomalies if anomalies else None}


def write_json(path: Path, rate: float, points: dict[str, dict[str, Any]], scores: dict[str, Any]) -> None:
    """`operating_point.json` of a report folder: the points, and per model and category the known-good and test
    scores on the daemon's scale with the labels (to try other rules without scoring again)."""
    import json

    path.write_text(json.dumps({"false_reject_rate": rate, "points": points, "scores": scores}) + "\n")


def markdown(name: str, rate: float, points: dict[str, dict[str, Any]]) -> str:
    """The operating-point table of one model (categories, then the pooled row)."""

    def pct(count: int, total: int) -> str:
        return f"{100 * count / total:.1f} % ({count}/{total})" if total else "n/a"

    lines = [f"## {name}: operating point at a {100 * rate:g} % target false-reject rate (daemon rule, references "
             "only)", "", "| category | threshold | FRR achieved | miss rate | known-good frames |",
             "|---|---|---|---|---|"]
    for category, p in points.items():
        lines.append(f"| {category} | {p['threshold']:.4f} | {pct(p['false_rejects'], p['normals'])} | "
                     f"{pct(p['missed'], p['anomalies'])} | {p.get('known_good', 'n/a')} |")
    if points:
        total = pooled(points)
        lines.append(f"| **pooled** | | {pct(total['false_rejects'], total['normals'])} | "
                     f"{pct(total['missed'], total['anomalies'])} | |")
    return "\n".join(lines) + "\n"
