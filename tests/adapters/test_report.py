"""Tests of adapters.report: metrics.json / metrics.md contents, curve PNGs, heat-map overlays."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from adapters.report import (
    COLUMN_TITLES,
    PLOT_DPI,
    PLOT_SIZE_INCHES,
    heatmap_overlay,
    plot_curves,
    write_overlay,
    write_report,
)
from model.metrics import METRIC_NAMES, mean_over_categories

NAN = float("nan")


def _metrics(base: float, **overrides: float) -> dict[str, float]:
    values = {name: base + i / 1000 for i, name in enumerate(METRIC_NAMES)}
    values.update(overrides)
    return {**values, "n_images": 10, "n_anomalous": 6}


def _results():
    clip_per_category = {
        "bottle": _metrics(0.9),
        "cable": _metrics(0.8, image_auroc=NAN, image_ap=NAN, image_f1_max=NAN),
    }
    ada_per_category = {"bottle": _metrics(0.7), "cable": _metrics(0.6)}
    return {
        "anomalyclip": (clip_per_category, mean_over_categories(clip_per_category)),
        "adaclip": (ada_per_category, mean_over_categories(ada_per_category)),
    }


def _table_rows(markdown: str, section: str) -> list[list[str]]:
    """Cells of the first table after the heading `section` (header row included, separator dropped)."""
    lines = markdown.splitlines()
    start = lines.index(section)
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    return rows


def test_write_report_single_model(tmp_path):
    results = _results()
    single = {"anomalyclip": results["anomalyclip"]}
    markdown = write_report(tmp_path, single)
    assert (tmp_path / "metrics.md").read_text(encoding="utf-8") == markdown
    rows = _table_rows(markdown, "## anomalyclip")
    assert rows[0] == ["category", *(COLUMN_TITLES[name] for name in METRIC_NAMES)]
    assert rows[0][-2:] == ["AUPRO", "AUPRO (AnomalyCLIP)"]
    assert [row[0] for row in rows[1:]] == ["bottle", "cable", "mean"]
    assert rows[1][1:] == ["90.0", "90.1", "90.2", "90.3", "90.4", "90.5", "90.6", "90.7"]
    assert rows[2][1:4] == ["n/a", "n/a", "n/a"] and rows[2][4] == "80.3"
    # mean: image metrics from bottle alone, pixel metrics over both
    assert rows[3][1] == "90.0" and rows[3][4] == "85.3"
    assert "image AUROC, image AP, image F1-max: cable" in markdown
    assert "Models (mean over categories)" not in markdown


def test_write_report_json_has_all_numbers_and_definitions(tmp_path):
    results = _results()
    write_report(tmp_path, results, models={"anomalyclip": {"version": "v1"}, "adaclip": {"version": "a2"}})
    document = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert "aupro (MVTec, FPR≤0.3)" in document["definitions"]["aupro"]
    assert "aupro (AnomalyCLIP variant)" in document["definitions"]["aupro_anomalyclip"]
    clip = document["models"]["anomalyclip"]
    assert clip["info"] == {"version": "v1"}
    assert clip["per_category"]["bottle"]["pixel_auroc"] == pytest.approx(0.903)
    assert clip["per_category"]["cable"]["image_auroc"] is None  # nan -> null, still valid JSON
    assert clip["mean"]["excluded"]["image_auroc"] == ["cable"]
    assert clip["mean"]["image_auroc"] == pytest.approx(0.9)
    assert list(document["models"]) == ["anomalyclip", "adaclip"]


def test_write_report_several_models_side_by_side(tmp_path):
    results = _results()
    markdown = write_report(tmp_path, results, models=["adaclip", "anomalyclip"])
    assert markdown.index("## adaclip") < markdown.index("## anomalyclip")
    rows = _table_rows(markdown, "## Models (mean over categories)")
    assert rows[0][0] == "model" and len(rows[0]) == 1 + len(METRIC_NAMES)
    assert [row[0] for row in rows[1:]] == ["adaclip", "anomalyclip"]
    assert rows[1][1] == "65.0"  # mean of 0.7 and 0.6
    assert rows[2][1] == "90.0"
    with pytest.raises(ValueError, match="winclip"):
        write_report(tmp_path, results, models=["winclip"])


def test_write_report_all_undefined_gives_na(tmp_path):
    per_category = {"screw": dict.fromkeys(METRIC_NAMES, NAN)}
    markdown = write_report(tmp_path, {"clip": (per_category, mean_over_categories(per_category))})
    rows = _table_rows(markdown, "## clip")
    assert rows[1][1:] == ["n/a"] * len(METRIC_NAMES)
    assert rows[2][1:] == ["n/a"] * len(METRIC_NAMES)
    document = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert document["models"]["clip"]["mean"]["pixel_auroc"] is None


def _category_data():
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 32, 32), np.uint8)
    masks[1, 5:12, 5:15] = 1
    masks[2, 20:30, 2:6] = 1
    maps = rng.random((4, 32, 32)).astype(np.float32) + masks * 0.5
    labels = np.array([0, 1, 1, 0])
    scores = np.array([0.2, 0.9, 0.6, 0.4])
    return labels, scores, masks, maps


def test_plot_curves_writes_decodable_pngs(tmp_path):
    labels, scores, masks, maps = _category_data()
    paths = plot_curves(tmp_path / "plots", "metal nut", labels, scores, masks, maps)
    assert [p.name for p in paths] == [
        "metal_nut_image_roc.png",
        "metal_nut_pixel_roc.png",
        "metal_nut_pro.png",
    ]
    side = int(PLOT_SIZE_INCHES * PLOT_DPI)
    for path in paths:
        image = cv2.imread(str(path))
        assert image is not None, path
        assert image.shape == (side, side, 3)
        assert image.std() > 5  # something was drawn


def test_plot_curves_undefined_and_without_maps(tmp_path):
    labels, scores, masks, maps = _category_data()
    paths = plot_curves(tmp_path, "good_only", [0, 0, 0], [0.1, 0.2, 0.3], np.zeros_like(masks[:3]), maps[:3])
    assert len(paths) == 3 and all(cv2.imread(str(p)) is not None for p in paths)
    paths = plot_curves(tmp_path, "scores_only", labels, scores)
    assert [p.name for p in paths] == ["scores_only_image_roc.png"]


def test_heatmap_overlay_shape_dtype_and_colours():
    rgb = np.full((40, 60, 3), 128, np.uint8)
    small_map = np.zeros((10, 10), np.float32)
    small_map[:, :5] = 1.0  # left half high, resized to the image
    overlay = heatmap_overlay(rgb, small_map)
    assert overlay.shape == (40, 60, 3) and overlay.dtype == np.uint8
    left, right = overlay[:, :20].reshape(-1, 3).mean(0), overlay[:, -20:].reshape(-1, 3).mean(0)
    assert left[0] > right[0] + 50  # red where the map is high
    assert right[2] > left[2] + 50  # blue where it is low
    untouched = heatmap_overlay(rgb, small_map, alpha=0.0)
    assert np.array_equal(untouched, rgb)


def test_heatmap_overlay_fixed_range_and_bad_input():
    rgb = np.full((8, 8, 3), 0, np.uint8)
    # with a fixed 0..1 range, a map of 0.05 everywhere is blue-ish (not red as per-map scaling would not say)
    low = heatmap_overlay(rgb, np.full((8, 8), 0.05), vmin=0.0, vmax=1.0, alpha=1.0)
    high = heatmap_overlay(rgb, np.full((8, 8), 0.95), vmin=0.0, vmax=1.0, alpha=1.0)
    assert low[..., 2].mean() > low[..., 0].mean() and high[..., 0].mean() > high[..., 2].mean()
    gray = heatmap_overlay(np.zeros((8, 8), np.uint8), np.ones((8, 8)))
    assert gray.shape == (8, 8, 3)
    with pytest.raises(ValueError, match="uint8"):
        heatmap_overlay(rgb.astype(np.float32), np.ones((8, 8)))
    with pytest.raises(ValueError, match="2-D"):
        heatmap_overlay(rgb, np.ones((2, 8, 8)))


def test_write_overlay_draws_green_mask_contour(tmp_path):
    rgb = np.full((64, 64, 3), 100, np.uint8)
    amap = np.zeros((16, 16), np.float32)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 1  # resized to the image: the square 16..47
    path = write_overlay(tmp_path / "sub" / "overlay.png", rgb, amap, mask)
    written = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    assert written.shape == (64, 64, 3)
    assert tuple(written[16, 30]) == (0, 255, 0)  # on the contour
    assert tuple(written[30, 30]) != (0, 255, 0)  # inside
    plain = cv2.imread(str(write_overlay(tmp_path / "plain.png", rgb, amap)))
    assert not np.any(np.all(plain == (0, 255, 0), axis=-1))
    with pytest.raises(ValueError, match="cannot write"):
        write_overlay(tmp_path / "overlay.unknownext", rgb, amap)
