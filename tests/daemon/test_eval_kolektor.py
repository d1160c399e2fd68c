"""`anomalyd eval --model patchcore --shots K` on a KolektorSDD layout (no train split): the reference pool never
enters the test set, metrics.json names the backbone PatchCore ran (not the CLIP default), and a pool of exactly K
images, with which every seed draws the same references, is said."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from daemon.cli import main
from model.datasets import DatasetError, discover
from model.kshot import reference_pool

FOLDERS, PARTS = 3, (False, True, False, False)  # 12 parts: 9 normal, 3 defective


def kolektor(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for f in range(FOLDERS):
        for index, defect in enumerate(PARTS):
            folder = root / f"kos{f:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            image = rng.integers(90, 110, (64, 48, 3), dtype=np.uint8)
            label = np.zeros((64, 48), np.uint8)
            if defect:
                image[20:36, 14:30] = 250
                label[20:36, 14:30] = 255
            assert cv2.imwrite(str(folder / f"Part{index}.jpg"), image)
            assert cv2.imwrite(str(folder / f"Part{index}_label.bmp"), label)
    return root


def test_a_kolektor_layout_has_no_train_split(tmp_path):
    root = kolektor(tmp_path / "KolektorSDD")
    assert len(discover(root)) == 12
    with pytest.raises(DatasetError, match="no 'train' split"):
        discover(root, split="train")


@pytest.mark.slow
def test_kshot_eval_on_kolektor_keeps_the_pool_out_names_the_backbone_and_warns_when_seeds_agree(tmp_path, capsys):
    root = kolektor(tmp_path / "KolektorSDD")
    normals = [s for s in discover(root) if s.label == 0]
    pool = reference_pool(normals, from_train=False)
    assert len(pool) == 4  # half of the 9 normals
    report = tmp_path / "report"
    code = main(["eval", "--data", str(root), "--model", "patchcore", "--device", "cpu", "--shots", str(len(pool)),
                 "--seed", "3", "--json", "--report", str(report)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    printed = json.loads(captured.out)["patchcore"]["per_category"]["KolektorSDD"]
    # 12 parts less the 4 pool images (the leak scored all 12, the references among them)
    assert (printed["n_images"], printed["n_anomalous"]) == (12 - len(pool), 3)
    assert "KolektorSDD: its reference pool has exactly 4 images: every seed draws the same references" in captured.err
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["models"]["patchcore"]["info"]["backbone"] == "efficientnet-lite0"  # was ViT-L-14-336
