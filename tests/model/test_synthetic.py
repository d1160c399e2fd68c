"""Synthetic anomalies: masks mark exactly what changed, determinism, and the dataset's items."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.dataset_loading import InspectionDataset, collate_samples
from model.datasets import Sample
from model.synthetic import CHANGE_THRESHOLD, KINDS, SyntheticAnomalies, make_synthetic_anomaly


def _textured(size: int = 96, seed: int = 0) -> np.ndarray:
    """A smooth gradient with some texture: parts of it look alike, parts do not."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([xx * 2, yy * 2, (xx + yy)], axis=2).astype(np.float32) % 256
    return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


def _write_normals(folder: Path, count: int) -> list[Sample]:
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for index in range(count):
        path = folder / f"{index}.png"
        Image.fromarray(_textured(80, seed=index)).save(path)
        samples.append(Sample(path, "widget", "good", 0, None, True))
    return samples


@pytest.mark.parametrize("kind", KINDS)
def test_mask_marks_exactly_what_changed(kind: str):
    image = _textured()
    source = _textured(seed=7)[::-1].copy()
    original = image.copy()
    for seed in range(12):
        result, mask = make_synthetic_anomaly(
            image, np.random.default_rng(seed), kind, source if seed % 2 else None
        )
        assert np.array_equal(image, original)  # the input is left alone
        assert result.shape == image.shape and result.dtype == np.uint8
        assert mask.shape == image.shape[:2] and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) == {0, 1}
        inside = mask.astype(bool)
        assert inside.sum() >= 16
        assert np.array_equal(result[~inside], image[~inside])  # exactly unchanged outside the mask
        change = np.abs(result.astype(int) - image.astype(int)).max(axis=2)
        assert change[inside].max() >= CHANGE_THRESHOLD
        assert inside.mean() < 0.5  # a defect, not a new image


def test_uniform_image_still_gets_a_visible_anomaly():
    grey = np.full((64, 64, 3), 128, np.uint8)
    for kind in KINDS:
        for seed in range(4):
            result, mask = make_synthetic_anomaly(grey, np.random.default_rng(seed), kind)
            assert mask.sum() >= 16, (kind, seed)
            assert np.array_equal(result[mask == 0], grey[mask == 0])
            assert (np.abs(result.astype(int) - 128).max(axis=2)[mask == 1] > 0).all()


def test_same_seed_same_anomaly():
    image = _textured()
    for kind in KINDS:
        first = make_synthetic_anomaly(image, np.random.default_rng(5), kind)
        second = make_synthetic_anomaly(image, np.random.default_rng(5), kind)
        other = make_synthetic_anomaly(image, np.random.default_rng(6), kind)
        assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
        assert not np.array_equal(first[1], other[1])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown synthetic anomaly kind 'scratch'"):
        make_synthetic_anomaly(_textured(), np.random.default_rng(0), "scratch")
    with pytest.raises(ValueError, match="RGB uint8"):
        make_synthetic_anomaly(np.zeros((32, 32), np.uint8), np.random.default_rng(0), "noise")
    with pytest.raises(ValueError, match="label 1"):
        SyntheticAnomalies([Sample(Path("x.png"), "c", "crack", 1, None, False)])
    with pytest.raises(ValueError, match="p_anomaly"):
        SyntheticAnomalies([_textured()], p_anomaly=1.5)


def test_p_anomaly_zero_passes_normals_through(tmp_path: Path):
    normals = _write_normals(tmp_path, 4)
    synthetic = SyntheticAnomalies(normals, image_size=48, p_anomaly=0.0)
    real = InspectionDataset(normals, image_size=48)
    for index in range(4):
        item = synthetic[index]
        assert item["label"] == 0 and item["has_mask"] is True and item["defect"] == "good"
        assert item["mask"].shape == (48, 48) and item["mask"].sum() == 0
        assert torch.equal(item["image"], real[index]["image"])  # the same transform as the real data
        assert item["path"] == str(normals[index].path) and item["category"] == "widget"


@pytest.mark.parametrize("transform", ["reference", "fast"])
def test_anomalous_items_change_only_inside_their_mask(tmp_path: Path, transform: str):
    normals = _write_normals(tmp_path, 3)
    synthetic = SyntheticAnomalies(normals, image_size=64, p_anomaly=1.0, transform=transform)
    real = InspectionDataset(normals, image_size=64, transform=transform)
    kinds = set()
    for index in range(len(synthetic)):
        item = synthetic[index]
        assert item["label"] == 1 and item["has_mask"] is True
        assert item["defect"] in {"synthetic_cutpaste", "synthetic_noise"}
        kinds.add(item["defect"])
        mask = item["mask"]
        assert mask.dtype == torch.float32 and set(mask.unique().tolist()) == {0.0, 1.0}
        difference = (item["image"] - real[index]["image"]).abs().amax(dim=0)
        assert difference[mask == 0].max() < 1e-5
        assert difference[mask == 1].max() > CHANGE_THRESHOLD / 255 / 0.27  # a visible change, normalised
    assert kinds  # at least one kind was drawn


def test_dataset_is_deterministic_and_mixes_labels():
    arrays = [_textured(64, seed=i) for i in range(16)]
    first = SyntheticAnomalies(arrays, image_size=64, p_anomaly=0.5, seed=3)
    again = SyntheticAnomalies(arrays, image_size=64, p_anomaly=0.5, seed=3)
    other_seed = SyntheticAnomalies(arrays, image_size=64, p_anomaly=0.5, seed=4)
    items = [first[i] for i in range(16)]
    labels = [item["label"] for item in items]
    assert 0 < sum(labels) < 16  # both normals and anomalies at p=0.5
    for index, item in enumerate(items):
        repeat = again[index]
        assert torch.equal(item["image"], repeat["image"]) and torch.equal(item["mask"], repeat["mask"])
        assert (item["mask"].sum() > 0) == (item["label"] == 1)
        assert item["path"] == f"<array {index}>" and item["category"] == "object"
    assert any(not torch.equal(item["image"], other_seed[i]["image"]) for i, item in enumerate(items))
    first.set_epoch(1)
    assert any(not torch.equal(item["image"], first[i]["image"]) for i, item in enumerate(items))


def test_unreadable_normal_is_an_error_item(tmp_path: Path):
    normals = _write_normals(tmp_path, 2)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    normals.append(Sample(broken, "widget", "good", 0, None, True))
    synthetic = SyntheticAnomalies(normals, image_size=32, p_anomaly=1.0)
    batch = collate_samples([synthetic[i] for i in range(3)])
    assert batch["image"].shape == (2, 3, 32, 32) and batch["label"].tolist() == [1, 1]
    assert len(batch["errors"]) == 1 and batch["errors"][0][0] == str(broken)
    assert "broken.png" in batch["errors"][0][1]


def test_real_image_at_model_size(samples_dir: Path):
    normal = Sample(
        samples_dir / "hazelnut/train/good/otx_train_good_00.jpg", "hazelnut", "good", 0, None, True
    )
    item = SyntheticAnomalies([normal, normal], image_size=518, p_anomaly=1.0, seed=1)[0]
    assert item["image"].shape == (3, 518, 518) and item["mask"].shape == (518, 518)
    area = item["mask"].mean().item()
    assert 0.0005 < area < 0.2
