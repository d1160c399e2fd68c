"""AdaCLIP's 2x2 same-category mosaic augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.dataset_loading import InspectionDataset, MosaicDataset
from model.datasets import Sample


def _samples(tmp_path: Path) -> list[Sample]:
    samples = []
    for index, (category, label) in enumerate([("a", 0), ("a", 0), ("a", 1), ("b", 0)]):
        path = tmp_path / f"{index}.png"
        Image.fromarray(np.full((40, 40, 3), 60 * index, np.uint8)).save(path)
        mask_path = None
        if label:
            mask_path = tmp_path / f"{index}_mask.png"
            mask = np.zeros((40, 40), np.uint8)
            mask[:20, :20] = 255
            Image.fromarray(mask).save(mask_path)
        samples.append(Sample(path, category, "good" if not label else "scratch", label, mask_path, True))
    return samples


def test_mosaic_tiles_same_category_images_and_merges_labels(tmp_path):
    base = InspectionDataset(_samples(tmp_path), image_size=28)
    always = MosaicDataset(base, probability=1.0, seed=1)
    for index in range(3):  # category "a": its peers are 0, 1, 2
        item = always[index]
        assert item["image"].shape == (3, 28, 28) and item["mask"].shape == (28, 28)
        tiles = [item["image"][:, r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14].mean() for r in (0, 1) for c in (0, 1)]
        plain = [base[i]["image"].mean() for i in range(3)]
        assert all(min(abs(t - p) for p in plain) < 0.05 for t in tiles)  # every tile is an image of category a
        assert item["label"] == int(item["mask"].sum() > 0)
    # category "b" has only itself: the mosaic repeats it
    torch.testing.assert_close(always[3]["image"][:, :14, :14], always[3]["image"][:, 14:, 14:])
    assert always[3]["label"] == 0


def test_mosaic_probability_zero_is_the_plain_dataset(tmp_path):
    base = InspectionDataset(_samples(tmp_path), image_size=28)
    never = MosaicDataset(base, probability=0.0)
    for index in range(len(base)):
        torch.testing.assert_close(never[index]["image"], base[index]["image"])
    with pytest.raises(ValueError, match=r"probability 1\.5"):
        MosaicDataset(base, probability=1.5)
