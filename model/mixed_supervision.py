"""Mixed-supervision evaluation (`anomalyd eval --shots K --train-anomalies N`): K normal references and N labelled
defective frames per category train, the rest is the test set; and the operating point a line sees. Plain
splitting and statistics, no family's maths: what trains on the labelled defects is the family's
(`LabelLearning.few_shot` in model/factory.py; patchcore-head's: model/supervised/evaluation.py).

The N training defects come from a fixed pool per category (the anomalous test images sorted by path, shuffled
with a fixed seed; min(`POOL_SIZE`, half of them)). The whole pool leaves the test set whatever N is, so the rows
for N = 0, 4, 16 are scored on the same frames; N larger than the pool uses the whole pool (reported). The N are
drawn from the pool with the run's seed.

Operating point: the image threshold that at most `rate` of the normal test frames exceed (the empirical
(1 - rate) quantile, "higher" method: the smallest score with at most floor(rate · n) normals above it), and the
miss rate of the defective test frames at it (score <= threshold counts as passed as good).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from model.datasets import Sample

POOL_SIZE = 16
POOL_SEED = 0
FALSE_REJECT_RATE = 0.005


@dataclass
class MixedSplit:
    """Per category: the labelled defects that train (N drawn from the pool) and the test set (pool removed)."""

    train_anomalies: dict[str, list[Sample]] = field(default_factory=dict)
    tests: dict[str, list[Sample]] = field(default_factory=dict)


def anomaly_pool(items: Sequence[Sample], pool_size: int = POOL_SIZE) -> list[Sample]:
    anomalous = sorted((s for s in items if s.label == 1), key=lambda s: str(s.path))
    random.Random(POOL_SEED).shuffle(anomalous)
    return anomalous[:min(pool_size, len(anomalous) // 2)]


def mixed_split(tests: dict[str, list[Sample]], n_anomalies: int, seed: int,
                pool_size: int = POOL_SIZE) -> MixedSplit:
    """Take each category's defect pool out of its test set and draw `n_anomalies` of it (seeded) to train."""
    if n_anomalies < 0:
        raise ValueError(f"--train-anomalies {n_anomalies}: expected 0 or more")
    split = MixedSplit()
    for category, items in tests.items():
        pool = anomaly_pool(items, pool_size)
        held = {s.path for s in pool}
        split.tests[category] = [s for s in items if s.path not in held]
        split.train_anomalies[category] = random.Random(seed).sample(pool, min(n_anomalies, len(pool)))
    return split


def operating_point(labels: Sequence[int], scores: Sequence[float], rate: float = FALSE_REJECT_RATE) -> dict[str, float]:
    """Threshold at `rate` false rejects on the normals, miss rate of the defects at it (see module docstring)."""
    labels_ = np.asarray(labels, dtype=int)
    scores_ = np.asarray(scores, dtype=np.float64)
    normals = np.sort(scores_[labels_ == 0])[::-1]
    defects = scores_[labels_ == 1]
    if normals.size == 0 or defects.size == 0:
        return {"threshold": math.nan, "miss_rate": math.nan, "false_reject_rate": math.nan,
                "missed": math.nan, "defects": float(defects.size)}
    allowed = math.floor(rate * normals.size)
    threshold = float(normals[min(allowed, normals.size - 1)])
    missed = int((defects <= threshold).sum())
    return {"threshold": threshold, "miss_rate": missed / defects.size,
            "false_reject_rate": float((normals > threshold).mean()), "missed": float(missed),
            "defects": float(defects.size)}


def operating_point_table(points: dict[str, dict[str, dict[str, float]]], rate: float = FALSE_REJECT_RATE) -> str:
    """Markdown: per model and category, defects missed at the threshold for `rate` false rejects."""
    lines = [f"Operating point: threshold at {rate:.1%} false rejects on the normal test frames",
             "", "| model | category | missed defects | miss rate | realised FRR |", "|---|---|---|---|---|"]
    for model, categories in points.items():
        for category, point in categories.items():
            if math.isnan(point["miss_rate"]):
                continue
            lines.append(f"| {model} | {category} | {int(point['missed'])}/{int(point['defects'])} | "
                         f"{point['miss_rate']:.1%} | {point['false_reject_rate']:.1%} |")
    return "\n".join(lines) + "\n"
