"""The learned head on tiles (issue 20: the same geometry options for the trainable detector): long strips of three
real metal_plate images side by side, `resize = "auto"` (each strip cut into tiles of its short side). Each tile of
a defective strip is labelled by its own part of the mask; a strip with its image label only gives its most
anomalous tile; the head's maps come back in the strip's pixels. Real Lite0 weights, the shared samples (never
copied: the strips are written under the test's tmp_path)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model import create_detector
from model.checkpoints import CheckpointError
from model.datasets import discover
from model.geometry import make_geometry
from model.metrics import image_metrics
from model.supervised.detector import HeadCheckpoint
from model.supervised.frames import expand, load_frame, load_frame_mask

SIDE = 128  # each image of a strip: strips of 384 x 128, which auto cuts into tiles of 128 at the model's 128 px


def write_strips(samples_dir: Path, root: Path) -> dict[str, list[Path]]:
    """Train strips in root/data/strips (MVTec layout: 6 good, 6 defective with masks but 2 of them without), unseen strips
    in root/unseen (4 good, 6 defective). Every source image is used once."""
    samples = [s for s in discover(samples_dir, split="test") if s.category == "metal_plate"]
    rng = random.Random(0)
    goods = [s.path for s in samples if s.label == 0]
    defects = [s for s in samples if s.label == 1 and s.has_mask]
    rng.shuffle(goods)
    rng.shuffle(defects)
    files: dict[str, list[Path]] = {"unseen_good": [], "unseen_defective": []}
    used = 0

    def save(parts: list[Path], where: Path, name: str, defect=None, at: int = 0) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        images = [np.asarray(Image.open(p).convert("RGB").resize((SIDE, SIDE))) for p in parts]
        Image.fromarray(np.concatenate(images, axis=1)).save(where / name)
        if defect is not None:
            mask = np.zeros((SIDE, 3 * SIDE), np.uint8)
            mask[:, at * SIDE:(at + 1) * SIDE] = np.asarray(
                Image.open(defect.mask_path).convert("L").resize((SIDE, SIDE), Image.NEAREST))
            masks = root / "data" / "strips" / "ground_truth" / "defect"
            masks.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(masks / f"{Path(name).stem}_mask.png")
        return where / name

    def strip_of(defect=None, at: int = 0) -> list[Path]:
        nonlocal used
        count = 3 if defect is None else 2
        parts = goods[used:used + count]
        used += count
        if defect is not None:
            parts.insert(at, defect.path)
        return parts

    for i in range(6):
        save(strip_of(), root / "data" / "strips" / "test" / "good", f"g{i}.png")
    for i in range(6):
        # the last two without a mask file: image labels only
        save(strip_of(defects[i], i % 3), root / "data" / "strips" / "test" / "defect", f"d{i}.png",
             defects[i] if i < 4 else None, i % 3)
    for i in range(4):
        files["unseen_good"].append(save(strip_of(), root / "unseen", f"g{i}.png"))
    for i in range(6):
        files["unseen_defective"].append(save(strip_of(defects[6 + i], i % 3), root / "unseen", f"d{i}.png"))
    return files


@pytest.mark.shared
def test_head_trains_on_tiles_of_long_strips_and_maps_them_back(samples_dir: Path, tmp_path: Path) -> None:
    from daemon.cli import main

    unseen = write_strips(samples_dir, tmp_path)
    data, output = tmp_path / "data", tmp_path / "head.safetensors"
    assert main(["train", "--model", "patchcore-head", "--data", str(data), "--image-size", str(SIDE), "--seed", "0",
                 "--device", "cpu", "--resize", "auto", "--output", str(output)]) == 0
    checkpoint = HeadCheckpoint.load(output)
    assert checkpoint.metadata["geometry"].startswith("auto")
    items = checkpoint.metadata["items"]
    assert items["anomalous_masked"] == 4 and items["anomalous_weak"] == 2
    # the tiles a masked strip's defect falls on (each strip is 4 overlapping tiles), plus one per weak strip
    geometry = make_geometry("auto")
    samples = [s for s in discover(data, split="test") if s.category == "strips" and s.label == 1 and s.has_mask]
    masked_tiles = sum(int(tile.any()) for s in samples
                       for tile in load_frame_mask(s, geometry, SIDE, (SIDE, 3 * SIDE)))
    assert load_frame(samples[0].path, geometry, SIDE).shape == (4, 3, SIDE, SIDE)
    assert items["anomalous_tiles"] == masked_tiles + 2 and 4 <= masked_tiles < 4 * 4

    references = sorted((data / "strips" / "test" / "good").iterdir())
    detector = create_detector("patchcore-head", head=output, references=[str(p) for p in references],
                               image_size=SIDE, device="cpu", geometry=geometry)
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in unseen["unseen_good"] + unseen["unseen_defective"]]
    scores, maps = detector.predict_frames(frames)
    assert all(m.shape == (SIDE, 3 * SIDE) for m in maps) and np.all((scores >= 0) & (scores <= 1))
    labels = np.array([0] * len(unseen["unseen_good"]) + [1] * len(unseen["unseen_defective"]))
    auroc = image_metrics(labels, np.asarray(scores, np.float64))["image_auroc"]
    print(f"tile head on unseen strips: image AUROC {auroc:.3f}, scores {np.round(scores, 3).tolist()}")
    assert auroc >= 0.8
    with pytest.raises(CheckpointError, match="trained on resize 'auto'"):
        create_detector("patchcore-head", head=output, references_later=True, image_size=SIDE, device="cpu")


def test_expand_splits_tiled_frames_and_their_masks_alike() -> None:
    import torch

    frames = [torch.zeros(3, 8, 8), torch.zeros(3, 3, 8, 8), torch.zeros(1, 3, 8, 8).squeeze(0)]
    masks = [torch.zeros(8, 8), torch.ones(3, 8, 8), torch.zeros(8, 8)]
    inputs, owners = expand(frames)
    split_masks, mask_owners = expand(masks, like=frames)
    assert [tuple(i.shape) for i in inputs] == [(3, 8, 8)] * 5 and owners == [0, 1, 1, 1, 2] == mask_owners
    assert [float(m.sum()) for m in split_masks] == [0.0, 64.0, 64.0, 64.0, 0.0]
