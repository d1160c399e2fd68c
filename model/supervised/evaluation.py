"""Mixed-supervision evaluation: K normal references and N labelled defective frames per category train, the rest
is the test set; and the operating point a line sees.

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
import torch

from model.dataset_loading import TransformName, load_image, load_mask
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


def load_training_frames(samples: Sequence[Sample], image_size: int, transform: TransformName, *, weak: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images (N, 3, S, S), masks (N, S, S), has_mask (N,)) of labelled defective samples; `weak`: no masks."""
    if not samples:
        return torch.zeros(0, 3, image_size, image_size), torch.zeros(0, image_size, image_size), \
            torch.zeros(0, dtype=torch.bool)
    images = torch.stack([load_image(s.path, image_size, transform) for s in samples])
    has_mask = torch.tensor([(not weak) and s.has_mask for s in samples], dtype=torch.bool)
    masks = torch.stack([load_mask(s, image_size) if bool(m) else torch.zeros(image_size, image_size)
                         for s, m in zip(samples, has_mask, strict=True)])
    return images, masks, has_mask


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


def category_detector(base: object, model_name: str, references: Sequence[Sample], anomalies: Sequence[Sample],
                      *, weak: bool, transform: TransformName, seed: int) -> object:
    """The detector to evaluate on one category: PatchCore itself for `patchcore` without labelled defects,
    else a head trained (model/supervised) on the references, the labelled defects and synthetic defects."""
    from model.supervised.detector import PatchcoreHeadDetector, fit_head
    from model.supervised.training import HeadTrainingConfig

    if model_name == "patchcore" and not anomalies:
        return base
    detector = base if isinstance(base, PatchcoreHeadDetector) else PatchcoreHeadDetector(base)  # type: ignore[arg-type]
    size = detector.image_size
    if detector.geometry.plain:
        reference_images = torch.stack([load_image(s.path, size, transform) for s in references])
        images, masks, has_mask = load_training_frames(anomalies, size, transform, weak=weak)
    else:  # fit / ROI: each frame cut as PatchCore's geometry cuts it, its mask the same way
        from model.supervised.frames import load_frame, load_training_frames_geometry

        reference_images = [load_frame(s.path, detector.geometry, size) for s in references]
        images, masks, has_mask = load_training_frames_geometry(anomalies, detector.geometry, size, weak=weak)
    fit_head(detector, reference_images, images, masks, has_mask, HeadTrainingConfig(seed=seed))
    return detector
