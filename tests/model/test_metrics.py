"""Tests of model.metrics: against sklearn, hand-computed cases, brute-force references and the golden fixture."""

from __future__ import annotations

import json
import math
from bisect import bisect_right

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from model.metrics import (
    METRIC_LABELS,
    METRIC_NAMES,
    PIXEL_METRICS,
    EvalRecord,
    MetricAccumulator,
    evaluate,
    image_metrics,
    pixel_curves,
    pixel_metrics,
)

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# ------------------------------------------------------------------------------------- references
def _f1_max_sklearn(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.nanmax(f1))


def _aupro_sweep_reference(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> float:
    """MVTec AUPRO by brute force: binarise at every distinct score, PRO over 8-connected regions."""
    regions = []
    for mask, amap in zip(masks, maps, strict=True):
        labelled, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
        regions += [amap[labelled == k] for k in range(1, count + 1)]
    normal = maps[masks == 0]
    fprs, pros = [0.0], [0.0]
    for th in np.unique(maps)[::-1]:
        fprs.append(float(np.mean(normal >= th)))
        pros.append(float(np.mean([np.mean(region >= th) for region in regions])))
    fprs.append(1.0)
    pros.append(1.0)
    # trapezoid up to max_fpr, the last segment interpolated (as the MVTec evaluation code's trapezoid)
    ins = bisect_right(fprs, max_fpr)
    area = sum((fprs[i + 1] - fprs[i]) * (pros[i + 1] + pros[i]) / 2 for i in range(ins - 1))
    if fprs[ins - 1] < max_fpr:
        y = pros[ins - 1] + (pros[ins] - pros[ins - 1]) * (max_fpr - fprs[ins - 1]) / (
            fprs[ins] - fprs[ins - 1]
        )
        area += (max_fpr - fprs[ins - 1]) * (y + pros[ins - 1]) / 2
    return area / max_fpr


def _aupro_official_reference(masks: np.ndarray, amaps: np.ndarray, max_step=200, expect_fpr=0.3) -> float:
    """The official AnomalyCLIP cal_pro_score, with scipy's 8-connected labelling for skimage's."""
    binary_amaps = np.zeros_like(amaps, dtype=bool)
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / max_step
    pros, fprs = [], []
    for th in np.arange(min_th, max_th, delta):
        binary_amaps[amaps <= th], binary_amaps[amaps > th] = 0, 1
        pro = []
        for binary_amap, mask in zip(binary_amaps, masks, strict=True):
            labelled, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
            for k in range(1, count + 1):
                region = labelled == k
                pro.append(binary_amap[region].sum() / region.sum())
        inverse_masks = 1 - masks
        fprs.append(np.logical_and(inverse_masks, binary_amaps).sum() / inverse_masks.sum())
        pros.append(np.array(pro).mean())
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < expect_fpr
    fprs = fprs[keep]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return float(auc(fprs, pros[keep]))


def _random_maps(seed: int, n: int = 4, size: int = 12, decimals: int = 2):
    """Small masks with blob regions and maps correlated with them; rounding makes plenty of ties."""
    rng = np.random.default_rng(seed)
    masks = (ndimage.gaussian_filter(rng.random((n, size, size)), (0, 1.5, 1.5)) > 0.56).astype(np.uint8)
    masks[0] = 0  # one fully normal image
    maps = rng.random((n, size, size)) * 0.8 + masks * 0.3
    return masks, np.round(maps, decimals).astype(np.float32)


# ------------------------------------------------------------------------------------- image level
def test_image_metrics_match_sklearn_on_random_data():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200) + 0.3 * labels, 1)  # ties
    result = image_metrics(labels, scores)
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert result["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert result["image_f1_max"] == pytest.approx(_f1_max_sklearn(labels, scores), abs=1e-12)
    assert 0.5 < result["image_auroc"] < 1.0


def test_image_f1_max_equals_best_threshold_by_hand():
    # scores 0.9(1) 0.8(0) 0.7(1) 0.1(0): threshold 0.7 gives P=2/3, R=1 -> F1 = 0.8
    result = image_metrics([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1])
    assert result["image_f1_max"] == pytest.approx(0.8)
    assert result["image_auroc"] == pytest.approx(0.75)
    assert result["image_ap"] == pytest.approx((1 + 2 / 3) / 2)


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0], []])
def test_image_metrics_single_class_is_nan(labels):
    result = image_metrics(labels, [0.5] * len(labels))
    assert set(result) == {"image_auroc", "image_ap", "image_f1_max"}
    assert all(math.isnan(v) for v in result.values())


def test_image_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        image_metrics([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="0 or 1"):
        image_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="differ in length"):
        image_metrics([0, 1, 1], [0.1, 0.2])


# ------------------------------------------------------------------------------------- pixel level
def test_pixel_metrics_by_hand_on_a_4x4_map():
    mask = np.zeros((1, 4, 4), np.uint8)
    mask[0, :2, :2] = 1  # one region of 4 pixels, 12 normal pixels
    amap = np.full((1, 4, 4), 0.1, np.float32)
    amap[0, :2, :2] = [[0.9, 0.8], [0.3, 0.2]]
    amap[0, 3, 3] = 0.7
    result = pixel_metrics(mask, amap)
    # pairs (anomalous > normal): 12 + 12 + 11 + 11 of 48
    assert result["pixel_auroc"] == pytest.approx(46 / 48, abs=1e-12)
    # precision at each recall step of 1/4: 1, 1, 3/4, 4/5
    assert result["pixel_ap"] == pytest.approx((1 + 1 + 0.75 + 0.8) / 4, abs=1e-12)
    assert result["pixel_f1_max"] == pytest.approx(2 * 0.8 / 1.8, abs=1e-12)
    # PRO curve: PRO 0.5 up to FPR 1/12, then 1 -> (0.5/12 + (0.3 - 1/12)) / 0.3
    assert result["aupro"] == pytest.approx((0.5 / 12 + 0.3 - 1 / 12) / 0.3, abs=1e-12)
    # official variant: every kept FPR is 0 or 1/12 (rescaled to 0 or 1); PRO is 0.5 on both sides of the jump
    assert result["aupro_anomalyclip"] == pytest.approx(0.5, abs=1e-9)


def test_regions_are_8_connected_like_skimage_label():
    mask = np.zeros((1, 6, 6), np.uint8)
    mask[0, 1, 1] = mask[0, 2, 2] = 1  # touch diagonally: one region for skimage.measure.label's default
    mask[0, 4, 4] = 1  # a second region
    amap = np.linspace(0, 1, 36, dtype=np.float32).reshape(1, 6, 6)
    curves = pixel_curves(mask, amap)
    assert curves is not None and curves.n_regions == 2
    # the diagonal pair weighs 1/2 each: at the highest anomalous score (4,4) alone PRO = (0 + 1) / 2
    assert curves.pro[0] == pytest.approx(0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_metrics_match_sklearn_and_brute_force(seed):
    masks, maps = _random_maps(seed)
    assert 0 < masks.sum() < masks.size
    result = pixel_metrics(masks, maps)
    flat_labels, flat_scores = masks.ravel(), maps.ravel()
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(flat_labels, flat_scores), abs=1e-12)
    assert result["pixel_ap"] == pytest.approx(average_precision_score(flat_labels, flat_scores), abs=1e-12)
    assert result["pixel_f1_max"] == pytest.approx(_f1_max_sklearn(flat_labels, flat_scores), abs=1e-12)
    assert result["aupro"] == pytest.approx(_aupro_sweep_reference(masks, maps), abs=1e-9)
    assert result["aupro_anomalyclip"] == pytest.approx(_aupro_official_reference(masks, maps), abs=1e-9)


def test_aupro_integration_limit_is_respected():
    masks, maps = _random_maps(5, decimals=3)
    for max_fpr in (0.05, 0.3, 1.0):
        got = pixel_metrics(masks, maps, max_fpr=max_fpr)["aupro"]
        assert got == pytest.approx(_aupro_sweep_reference(masks, maps, max_fpr), abs=1e-9)
    # a lower limit only sees the steep start of the curve: a smaller normalised area here
    assert (
        pixel_metrics(masks, maps, max_fpr=0.05)["aupro"] < pixel_metrics(masks, maps, max_fpr=1.0)["aupro"]
    )


def test_roc_polyline_area_equals_auroc():
    masks, maps = _random_maps(3)
    curves = pixel_curves(masks, maps)
    fpr, tpr = curves.roc()
    assert np.all(np.diff(fpr) >= 0)
    assert auc(fpr, tpr) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)


def test_pixel_metrics_accept_sequences_and_tensors():
    torch = pytest.importorskip("torch")
    masks, maps = _random_maps(4)
    stacked = pixel_metrics(masks, maps)
    as_list = pixel_metrics(list(masks), list(maps))
    as_tensors = pixel_metrics(torch.from_numpy(masks), torch.from_numpy(maps))
    assert as_list == pytest.approx(stacked, abs=1e-12)
    assert as_tensors == pytest.approx(stacked, abs=1e-12)


@pytest.mark.parametrize("fill", [0, 1])
def test_pixel_metrics_undefined_without_both_classes(fill):
    masks = np.full((2, 5, 5), fill, np.uint8)
    maps = np.random.default_rng(0).random((2, 5, 5)).astype(np.float32)
    result = pixel_metrics(masks, maps)
    assert set(result) == set(PIXEL_METRICS)
    assert all(math.isnan(v) for v in result.values())
    assert pixel_curves(masks, maps) is None


def test_pixel_metrics_constant_map_gives_nan_variant_not_error():
    masks = np.zeros((1, 4, 4), np.uint8)
    masks[0, 0, 0] = 1
    result = pixel_metrics(masks, np.full((1, 4, 4), 0.5, np.float32))
    assert result["pixel_auroc"] == pytest.approx(0.5)
    assert math.isnan(result["aupro_anomalyclip"])


def test_pixel_metrics_reject_mismatched_shapes_and_nan():
    with pytest.raises(ValueError, match="does not match"):
        pixel_metrics(np.zeros((1, 4, 4)), np.zeros((1, 4, 5), np.float32))
    bad = np.zeros((1, 4, 4), np.float32)
    bad[0, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pixel_metrics(np.eye(4)[None], bad)


# ------------------------------------------------------------------------------------- per category
def _records():
    rng = np.random.default_rng(7)
    records = []
    for category, n in (("bottle", 6), ("screw", 5)):
        masks, maps = _random_maps(int(rng.integers(100)), n=n)
        labels = (masks.reshape(n, -1).max(1) > 0).astype(int)
        scores = rng.random(n) + labels * 0.5
        for i in range(n):
            records.append(EvalRecord(category, int(labels[i]), float(scores[i]), maps[i], masks[i]))
    # a category whose test set has no normal image: image metrics undefined, pixel metrics fine
    masks, maps = _random_maps(11, n=3)
    masks[0, 2, 2] = 1
    for i in range(3):
        records.append(("cable", 1, 0.4 + i / 10, maps[i], masks[i]))
    return records


def test_evaluate_per_category_and_nan_aware_mean():
    records = _records()
    per_category, mean = evaluate(records)
    assert list(per_category) == ["bottle", "screw", "cable"]
    for category, metrics in per_category.items():
        mine = [r for r in records if r[0] == category]
        expected_image = image_metrics([r[1] for r in mine], [r[2] for r in mine])
        expected_pixel = pixel_metrics(np.stack([r[4] for r in mine]), np.stack([r[3] for r in mine]))
        for name, value in {**expected_image, **expected_pixel}.items():
            assert metrics[name] == pytest.approx(value, abs=1e-12, nan_ok=True), (category, name)
        assert metrics["n_images"] == len(mine)
        assert metrics["n_anomalous"] == sum(r[1] for r in mine)
    assert math.isnan(per_category["cable"]["image_auroc"])
    assert mean["excluded"]["image_auroc"] == ["cable"]
    assert mean["n_used"]["image_auroc"] == 2
    assert mean["n_used"]["pixel_auroc"] == 3 and mean["excluded"]["pixel_auroc"] == []
    assert mean["image_auroc"] == pytest.approx(
        (per_category["bottle"]["image_auroc"] + per_category["screw"]["image_auroc"]) / 2
    )
    assert mean["pixel_auroc"] == pytest.approx(np.mean([m["pixel_auroc"] for m in per_category.values()]))
    assert mean["n_categories"] == 3
    assert set(METRIC_NAMES) <= set(mean) and set(METRIC_NAMES) <= set(METRIC_LABELS)


def test_accumulator_batches_equal_evaluate():
    records = _records()
    expected, expected_mean = evaluate(records)
    acc = MetricAccumulator()
    for category in ("bottle", "screw", "cable"):
        mine = [r for r in records if r[0] == category]
        for start in range(0, len(mine), 2):  # batches of 2
            batch = mine[start : start + 2]
            acc.add(
                category,
                np.array([r[1] for r in batch]),
                np.array([r[2] for r in batch]),
                maps=np.stack([r[3] for r in batch]),
                masks=np.stack([r[4] for r in batch]),
            )
    bottle = acc.compute_category("bottle")  # releases bottle's maps; compute() reuses the result
    per_category, mean = acc.compute()
    assert per_category["bottle"] is bottle
    for category in expected:
        for name in METRIC_NAMES:
            assert per_category[category][name] == pytest.approx(
                expected[category][name], abs=1e-12, nan_ok=True
            )
    assert mean["excluded"] == expected_mean["excluded"]
    with pytest.raises(ValueError, match="already computed"):
        acc.add("bottle", [0], [0.1])


def test_accumulator_missing_masks_and_maps():
    acc = MetricAccumulator()
    amap = np.zeros((4, 4), np.float32)
    amap[0, 0] = 1.0
    mask = np.zeros((4, 4), np.uint8)
    mask[0, 0] = 1
    # normal image without a mask: all normal; anomalous image without a mask: left out of pixel metrics
    acc.add(
        "nut", [0, 1, 1], [0.1, 0.9, 0.8], maps=np.stack([amap * 0, amap, amap]), masks=[None, mask, None]
    )
    acc.add("plain", [0, 1], [0.2, 0.7])  # a model without maps
    per_category, mean = acc.compute()
    nut = per_category["nut"]
    assert nut["n_pixel_images"] == 2 and nut["n_no_mask"] == 1
    assert nut["pixel_auroc"] == pytest.approx(1.0)
    assert nut["image_auroc"] == pytest.approx(1.0)
    assert all(math.isnan(per_category["plain"][name]) for name in PIXEL_METRICS)
    assert per_category["plain"]["image_auroc"] == pytest.approx(1.0)
    assert mean["excluded"]["pixel_auroc"] == ["plain"]
    assert mean["pixel_auroc"] == pytest.approx(1.0)


def test_accumulator_errors_name_the_category():
    acc = MetricAccumulator()
    with pytest.raises(ValueError, match=r"'gear'.*2 labels for 3 scores"):
        acc.add("gear", [0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"'gear'.*mask 0 shape"):
        acc.add("gear", [1], [0.5], maps=np.zeros((1, 4, 4)), masks=np.zeros((1, 5, 5)))
    with pytest.raises(ValueError, match=r"'gear'.*NaN"):
        acc.add("gear", [1], [float("inf")])
    with pytest.raises(KeyError, match="gear"):
        acc.compute_category("gear")  # nothing bad was recorded
    with pytest.raises(ValueError, match="record 0"):
        evaluate([("gear", 1, 0.5)])


# ------------------------------------------------------------------------------------- golden fixture
@pytest.fixture(scope="module")
def golden(golden_dir):
    from safetensors.torch import load_file

    tensors = load_file(str(golden_dir / "expected.safetensors"))
    wanted = ["inputs/masks", "inputs/labels"]
    wanted += [f"{cfg}/{name}" for cfg in ("L24", "L6-12-18-24") for name in ("anomaly_maps", "image_scores")]
    expected = json.loads((golden_dir / "expected.json").read_text())
    return {key: tensors[key].numpy() for key in wanted}, expected


@pytest.mark.shared
@pytest.mark.parametrize("config", ["L24", "L6-12-18-24"])
def test_golden_metrics_match_the_official_code(golden, config):
    tensors, expected = golden
    want = expected["metrics"][f"{config}/metrics"]
    masks, labels = tensors["inputs/masks"], tensors["inputs/labels"]
    image = image_metrics(labels, tensors[f"{config}/image_scores"])
    pixel = pixel_metrics(masks, tensors[f"{config}/anomaly_maps"])
    assert image["image_auroc"] == pytest.approx(want["image_auroc"], abs=1e-6)
    assert image["image_ap"] == pytest.approx(want["image_ap"], abs=1e-6)
    assert pixel["pixel_auroc"] == pytest.approx(want["pixel_auroc"], abs=1e-6)
    assert pixel["aupro_anomalyclip"] == pytest.approx(want["aupro_anomalyclip_variant"], abs=1e-4)
    # the MVTec definition is a different number (reported next to it)
    assert pixel["aupro"] != pytest.approx(pixel["aupro_anomalyclip"], abs=1e-5)


@pytest.mark.shared
def test_golden_float16_storage_changes_auroc_but_not_below_1e4(golden):
    """Why the accumulator keeps float32 by default: float16 is fine for AUROC, not for the 200-threshold AUPRO."""
    tensors, _ = golden
    masks, maps = tensors["inputs/masks"], tensors["L24/anomaly_maps"]
    exact = pixel_metrics(masks, maps)
    half = pixel_metrics(masks, maps.astype(np.float16))
    assert abs(half["pixel_auroc"] - exact["pixel_auroc"]) < 1e-4
    assert abs(half["aupro_anomalyclip"] - exact["aupro_anomalyclip"]) > 1e-4
