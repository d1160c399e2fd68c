"""The k-shot evaluation protocol: per category, K normal images become references, the rest is the test set.

Per category a fixed pool of normal images is set aside as candidate references:
- when the dataset has a training split with normals of that category (e.g. hazelnut in the inspection samples),
  the pool is up to `POOL_SIZE` of them and the whole test split stays the test set;
- otherwise the pool is up to `POOL_SIZE` test normals, and at most half of them (min(16, n // 2)), which then
  leave the test set (so that every category keeps normals to test on).
The pool is the same for every K and seed (a shuffle of the files sorted by path with a fixed seed); the K
references are drawn from it with the run's seed. A category whose pool is smaller than K is skipped (reported);
one whose pool is exactly K gets a note (every seed draws the same references). Pool images never stay in the test
set, even when a "train" split repeats test images.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from model.datasets import Sample

POOL_SIZE = 16
POOL_SEED = 0


@dataclass
class KShotSplit:
    """Per category: references (K samples) and the test samples; categories skipped, with the reason."""

    references: dict[str, list[Sample]] = field(default_factory=dict)
    tests: dict[str, list[Sample]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # warnings per category (e.g. pool size equals K)


def reference_pool(normals: Sequence[Sample], *, from_train: bool, pool_size: int = POOL_SIZE) -> list[Sample]:
    """The fixed pool of candidate references among a category's normals."""
    ordered = sorted(normals, key=lambda s: str(s.path))
    random.Random(POOL_SEED).shuffle(ordered)
    size = min(pool_size, len(ordered)) if from_train else min(pool_size, len(ordered) // 2)
    return ordered[:size]


def kshot_split(test_samples: Sequence[Sample], shots: int, seed: int = 0,
                train_samples: Sequence[Sample] = (), pool_size: int = POOL_SIZE) -> KShotSplit:
    """Split `test_samples` by category into K references and a test set (see the module docstring)."""
    if shots < 1:
        raise ValueError(f"--shots {shots}: expected at least 1 reference image per category")
    tests: dict[str, list[Sample]] = defaultdict(list)
    for sample in test_samples:
        tests[sample.category].append(sample)
    train_normals: dict[str, list[Sample]] = defaultdict(list)
    for sample in train_samples:
        if sample.label == 0:
            train_normals[sample.category].append(sample)
    split = KShotSplit()
    for category, items in tests.items():
        from_train = bool(train_normals.get(category))
        normals = train_normals[category] if from_train else [s for s in items if s.label == 0]
        pool = reference_pool(normals, from_train=from_train, pool_size=pool_size)
        if len(pool) < shots:
            split.skipped[category] = (
                f"{len(normals)} normal images give a reference pool of {len(pool)}, fewer than {shots} shots"
            )
            continue
        references = random.Random(seed).sample(pool, shots)
        if len(pool) == shots:
            split.notes[category] = (f"its reference pool has exactly {shots} images: every seed draws the same "
                                     "references (seeds agree)")
        held_out = {s.path for s in pool}  # never a test image, even if a "train" split repeats the test images
        remaining = [s for s in items if s.path not in held_out]
        if not any(s.label == 0 for s in remaining) or not any(s.label == 1 for s in remaining):
            split.skipped[category] = "the test set left needs both normal and anomalous images"
            continue
        split.references[category] = references
        split.tests[category] = remaining
    return split
