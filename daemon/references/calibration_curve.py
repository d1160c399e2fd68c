"""What a source's operating point costs, from its labelled frames: the score histogram of recent frames by label
and the curve of false-reject rate against miss rate over every threshold (the UI's references and calibration
page, daemon/api/calibration_view.py).

The daemon's rule is alert = score >= threshold, so at a threshold t a labelled normal scored >= t is a false
reject and a labelled anomaly scored < t is a miss. Between two neighbouring labelled scores every threshold gives
the same point; the curve offers the midpoint, which keeps the most room on both sides.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

KINDS = ("normal", "anomalous", "unlabelled")


def kind_of(label: str | None) -> str:
    return label if label in ("normal", "anomalous") else "unlabelled"


def histogram(scored: Sequence[tuple[float, str | None]], bins: int = 25) -> dict[str, Any]:
    """Counts of (score, newest label) pairs in `bins` equal bins of [0, 1] per kind (normal, anomalous,
    unlabelled); a score outside [0, 1] counts in the edge bin, the last bin includes 1."""
    if bins < 1:
        raise ValueError(f"bins must be at least 1, not {bins}")
    counts = {kind: [0] * bins for kind in KINDS}
    for score, label in scored:
        index = min(bins - 1, max(0, int(float(score) * bins)))
        counts[kind_of(label)][index] += 1
    return {"bins": bins, "edges": [round(i / bins, 6) for i in range(bins + 1)], **counts}


def point(normals: Sequence[float], anomalies: Sequence[float], threshold: float) -> dict[str, Any]:
    """False rejects and misses of the labelled frames at `threshold`; a rate is None without frames of its kind."""
    normal_sorted, anomaly_sorted = sorted(normals), sorted(anomalies)
    return _point(normal_sorted, anomaly_sorted, threshold)


def _point(normal_sorted: Sequence[float], anomaly_sorted: Sequence[float], threshold: float) -> dict[str, Any]:
    false_rejects = len(normal_sorted) - bisect_left(normal_sorted, threshold)
    misses = bisect_left(anomaly_sorted, threshold)
    return {"threshold": threshold, "false_rejects": false_rejects, "misses": misses,
            "false_reject_rate": false_rejects / len(normal_sorted) if normal_sorted else None,
            "miss_rate": misses / len(anomaly_sorted) if anomaly_sorted else None}


def candidate_thresholds(scores: Sequence[float]) -> list[float]:
    """One threshold per distinct operating point: the lowest score (everything alerts), the midpoints between
    neighbouring distinct scores, and one above the highest (nothing alerts; 1.0 when the highest is 1 or more,
    the top of the daemon's scale, where frames scored 1 still alert)."""
    distinct = sorted(set(float(s) for s in scores))
    if not distinct:
        return []
    middles = [(low + high) / 2 for low, high in pairwise(distinct)]
    top = distinct[-1]
    above = (top + 1.0) / 2 if top < 1.0 else 1.0
    out = [distinct[0], *middles]
    if above > out[-1]:
        out.append(above)
    return out


def operating_curve(normals: Sequence[float], anomalies: Sequence[float]) -> list[dict[str, Any]]:
    """The false-reject rate against the miss rate at every distinct threshold, lowest threshold first (false
    rejects falling, misses rising). Empty unless there are labelled normals and labelled anomalies."""
    if not normals or not anomalies:
        return []
    normal_sorted, anomaly_sorted = sorted(normals), sorted(anomalies)
    points: list[dict[str, Any]] = []
    for threshold in candidate_thresholds([*normal_sorted, *anomaly_sorted]):
        current = _point(normal_sorted, anomaly_sorted, threshold)
        if points and (points[-1]["false_rejects"], points[-1]["misses"]) == (current["false_rejects"],
                                                                              current["misses"]):
            continue  # the same counts are the same point
        points.append(current)
    return points
