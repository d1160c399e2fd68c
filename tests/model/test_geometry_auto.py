"""`resize = "auto"` on real long parts (issue 20): strips of three real metal_plate images side by side (a long
part under a line camera), one of them defective in a defective strip. Squashing such a strip shrinks it 3x along
its length; `auto` tiles it at its short side. Real Lite0 weights, the shared samples (never copied)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.datasets import discover
from model.geometry import frame_inputs, make_geometry
from model.metrics import image_metrics
from model.patchcore import build_patchcore

SIDE = 256  # each image of a strip, so a strip is 768 x 256: long enough for auto to tile it


def strip(paths: list[Path]) -> np.ndarray:
    return np.concatenate([np.asarray(Image.open(p).convert("RGB").resize((SIDE, SIDE))) for p in paths], axis=1)


@pytest.fixture(scope="module")
def strips(samples_dir: Path) -> dict[str, list[np.ndarray]]:
    samples = [s for s in discover(samples_dir, split="test") if s.category == "metal_plate"]
    rng = random.Random(0)
    goods = [s.path for s in samples if s.label == 0]
    defects = [s.path for s in samples if s.label == 1]
    rng.shuffle(goods)
    rng.shuffle(defects)
    references = [strip(goods[3 * i:3 * i + 3]) for i in range(4)]  # goods 0-11
    normal = [strip(goods[12 + 3 * i:15 + 3 * i]) for i in range(4)]  # goods 12-23
    defective = []
    for i in range(8):  # goods 24-39: every image is used once
        parts = goods[24 + 2 * i:26 + 2 * i]
        parts.insert(i % 3, defects[i])
        defective.append(strip(parts))
    return {"references": references, "normal": normal, "defective": defective}


def auroc(geometry_name: str, strips: dict[str, list[np.ndarray]]) -> float:
    geometry = make_geometry(geometry_name)
    detector = build_patchcore(device="cpu", image_size=SIDE, geometry=geometry)
    detector.set_references([frame_inputs(r, geometry, SIDE) for r in strips["references"]])
    scores, maps = detector.predict_frames(strips["normal"] + strips["defective"])
    assert all(m.shape == (SIDE, 3 * SIDE) for m in maps)  # maps in the strip's own pixels
    labels = np.array([0] * len(strips["normal"]) + [1] * len(strips["defective"]))
    return image_metrics(labels, np.asarray(scores, dtype=np.float64))["image_auroc"]


def test_auto_tiles_long_real_parts_and_ranks_them_better_than_squash(strips):
    tiled, squashed = auroc("auto", strips), auroc("squash", strips)
    print(f"image AUROC on 768 x 256 strips: auto {tiled:.3f}, squash {squashed:.3f}")
    assert tiled >= 0.95 and tiled >= squashed
