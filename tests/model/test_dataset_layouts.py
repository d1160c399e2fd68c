"""Dataset layouts beyond meta.json and MVTec: KolektorSDD (`kosNN/PartN.jpg` + `PartN_label.bmp`),
`<class>/{good,<defect>}` folders, clear errors for unknown layouts and one-class data, mask formats and sizes."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from model.dataset_loading import load_mask
from model.datasets import (
    DatasetError,
    SampleError,
    discover,
    is_mask_file,
    require_both_classes,
    scan_folder,
)


def image(path: Path, size=(40, 30), value=120) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((size[1], size[0], 3), value, np.uint8))
    return path


def mask(path: Path, size=(40, 30), defect=True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.zeros((size[1], size[0]), np.uint8)
    if defect:
        values[5:10, 5:10] = 255
    assert cv2.imwrite(str(path), values)
    return path


def kolektor(root: Path, folders=2, parts=(False, True, False)) -> Path:
    for f in range(folders):
        for index, defect in enumerate(parts):
            image(root / f"kos{f:02d}" / f"Part{index}.jpg")
            mask(root / f"kos{f:02d}" / f"Part{index}_label.bmp", defect=defect)
    return root


def test_kolektor_layout_labels_parts_by_their_masks(tmp_path):
    root = kolektor(tmp_path / "KolektorSDD")
    samples = discover(root)
    assert len(samples) == 6  # masks are not samples
    anomalous = [s for s in samples if s.label == 1]
    assert [s.path.name for s in anomalous] == ["Part1.jpg", "Part1.jpg"]
    assert all(s.mask_path.name == "Part1_label.bmp" and s.has_mask for s in anomalous)
    assert {s.category for s in samples} == {"KolektorSDD"}
    assert all(s.mask_path is None and s.label == 0 for s in samples if s.path.name != "Part1.jpg")
    assert load_mask(anomalous[0], 20).sum() > 0  # the BMP mask loads
    assert len(scan_folder(root / "kos01")) == 3  # one kosNN folder as the root


def test_class_folders_with_good_and_defect_subfolders(tmp_path):
    for cls, defect in (("screw", "scratch"), ("nut", "dent")):
        image(tmp_path / cls / "good" / "0.png")
        image(tmp_path / cls / "good" / "1.png")
        image(tmp_path / cls / defect / "0.png")
        mask(tmp_path / cls / "ground_truth" / defect / "0_mask.png")
    samples = discover(tmp_path)
    assert {s.category for s in samples} == {"screw", "nut"}
    assert sum(s.label for s in samples) == 2 and len(samples) == 6
    assert all(s.has_mask for s in samples)


def test_unrecognised_layout_says_what_was_found_and_what_is_expected(tmp_path):
    image(tmp_path / "a" / "b" / "c" / "x.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError) as raised:
        discover(tmp_path)
    message = str(raised.value)
    assert "found 2 folder(s) (a, empty), 0 image(s) directly inside and 1 in subfolders" in message
    assert "KolektorSDD" in message and "<class>/good/" in message and "meta.json" in message


def test_one_class_data_is_an_error_naming_the_counts(tmp_path):
    root = kolektor(tmp_path / "k", parts=(True, True))
    samples = discover(root)
    with pytest.raises(DatasetError, match=r"found 0 normal and 4 anomalous image\(s\) in 1 category \(k\); "
                                           r"training needs normal"):
        require_both_classes(samples, root, "training")


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tiff"])
def test_masks_of_every_format_are_size_checked_against_their_image(tmp_path, suffix):
    image(tmp_path / "good" / "0.png")
    image(tmp_path / "crack" / "0.png", size=(40, 30))
    mask(tmp_path / "ground_truth" / "crack" / f"0_mask{suffix}", size=(40, 30))
    sample = next(s for s in discover(tmp_path) if s.label == 1)
    assert sample.mask_path.suffix == suffix
    assert float(load_mask(sample, 16).max()) == 1.0
    mask(sample.mask_path, size=(20, 15))
    with pytest.raises(SampleError, match=r"mask is 20x15 but its image .* is 40x30"):
        load_mask(sample, 16)


def test_mask_files_of_known_layouts_are_recognised(tmp_path):
    root = kolektor(tmp_path / "k", folders=1)
    assert is_mask_file(root / "kos00" / "Part1_label.bmp")
    assert not is_mask_file(root / "kos00" / "Part1.jpg")
    gt = mask(tmp_path / "bottle" / "ground_truth" / "broken" / "000_mask.png")
    assert is_mask_file(gt)
    lonely = image(tmp_path / "photos" / "holiday_label.jpg")  # no partner image: a photo like any other
    assert not is_mask_file(lonely)
