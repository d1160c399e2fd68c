"""Evaluation metrics for anomaly detection: image level, pixel level, per category and averaged.

Definitions (the AnomalyCLIP / AdaCLIP papers' tables and the MVTec AD evaluation code):
- image AUROC / AP: sklearn's `roc_auc_score` / `average_precision_score` on the image scores; image F1-max: the
  largest F1 over the thresholds of sklearn's `precision_recall_curve`.
- pixel AUROC / AP / F1-max: the same definitions over all pixels of all images of a category.
- `aupro` (MVTec, FPR≤0.3): per-region overlap (PRO, the mean over all 8-connected ground-truth regions of all
  images of the fraction of the region above the threshold) against the FPR over all normal pixels, as the
  piecewise-linear curve through every distinct threshold, integrated over FPR in [0, max_fpr] (interpolated exactly
  at max_fpr) and divided by max_fpr.
- `aupro_anomalyclip` (the official AnomalyCLIP code's variant): 200 thresholds `np.arange(min, max, (max-min)/200)`,
  maps binarised with `> th`, keep FPR < 0.3, min-max rescale the kept FPRs to [0, 1], `sklearn.metrics.auc`.

Undefined values (a category with a single class; no anomalous or no normal pixels) are `nan`, never exceptions.
Means over categories leave out the categories where a metric is undefined and say which (`excluded`).

Pixel metrics sort the normal pixels once (float32, in place) and work on the few anomalous pixels against that
sorted array: no per-threshold passes over the maps, and memory stays at about one copy of the normal pixels.
`MetricAccumulator` gathers batches during evaluation; `compute_category` frees a finished category's maps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro", "aupro_anomalyclip")
METRIC_NAMES = IMAGE_METRICS + PIXEL_METRICS

# Labels for reports; the `aupro` ones name which definition they are (they differ noticeably).
METRIC_LABELS = {
    "image_auroc": "image AUROC (sklearn roc_auc_score)",
    "image_ap": "image AP (sklearn average_precision_score)",
    "image_f1_max": "image F1-max (max F1 over the precision-recall curve)",
    "pixel_auroc": "pixel AUROC (all pixels of all images of the category)",
    "pixel_ap": "pixel AP (all pixels of all images of the category)",
    "pixel_f1_max": "pixel F1-max (max F1 over the pixel precision-recall curve)",
    "aupro": "aupro (MVTec, FPR≤0.3): PRO over 8-connected regions, integrated over FPR in [0, 0.3], / 0.3",
    "aupro_anomalyclip": (
        "aupro (AnomalyCLIP variant): 200 thresholds, FPR < 0.3 kept, kept FPRs min-max rescaled to [0, 1]"
    ),
}

# Full (8-)connectivity, as skimage.measure.label's default for 2-D images (the official code uses it).
_REGION_STRUCTURE = np.ones((3, 3), dtype=bool)


class EvalRecord(NamedTuple):
    """One evaluated image; `evaluate` also takes plain 5-tuples in this order."""

    category: str
    label: int
    score: float
    map: Any = None  # (H, W) float anomaly map, or None
    mask: Any = None  # (H, W) {0,1} ground truth, or None (read as all-normal for a label-0 image)


# --------------------------------------------------------------------------------------------- helpers
def _to_numpy(value: Any, what: str) -> np.ndarray:
    """Numpy view of an array-like; torch tensors (any device) without importing torch here."""
    if hasattr(value, "detach"):
        value = value.detach()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            value = value.float()
        value = value.cpu().numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: not an array ({type(value).__name__}): {exc}") from exc


def _check_binary_labels(labels: np.ndarray, what: str) -> np.ndarray:
    labels = labels.reshape(-1)
    if labels.dtype == bool:
        return labels.astype(np.int64)
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        raise ValueError(f"{what}: labels must be 0 or 1, got {labels[bad][:5].tolist()}")
    return labels.astype(np.int64)


def _check_finite(values: np.ndarray, what: str) -> None:
    if not np.issubdtype(values.dtype, np.number) and values.dtype != bool:
        raise ValueError(f"{what}: expected numbers, got dtype {values.dtype}")
    finite = np.isfinite(values)
    if not finite.all():
        raise ValueError(f"{what}: {int(values.size - finite.sum())} value(s) are NaN or infinite")


def _f1_max(precision: np.ndarray, recall: np.ndarray) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    f1 = f1[np.isfinite(f1)]
    return float(f1.max()) if f1.size else 0.0


# --------------------------------------------------------------------------------------------- image level
def image_metrics(labels: Any, scores: Any) -> dict[str, float]:
    """Image AUROC, AP and F1-max (sklearn definitions); all `nan` when only one class is present."""
    labels = _check_binary_labels(_to_numpy(labels, "labels"), "labels")
    scores = _to_numpy(scores, "scores").reshape(-1).astype(np.float64)
    if labels.shape != scores.shape:
        raise ValueError(f"labels ({labels.size}) and scores ({scores.size}) differ in length")
    _check_finite(scores, "image scores")
    if labels.size == 0 or labels.min() == labels.max():
        return dict.fromkeys(IMAGE_METRICS, math.nan)
    precision, recall, _ = precision_recall_curve(labels, scores)
    return {
        "image_auroc": float(roc_auc_score(labels, scores)),
        "image_ap": float(average_precision_score(labels, scores)),
        "image_f1_max": _f1_max(precision, recall),
    }


# --------------------------------------------------------------------------------------------- pixel level
@dataclass(frozen=True)
class PixelCurves:
    """Counts at every distinct anomalous-pixel score, highest first: enough for ROC, PR and PRO exactly.

    Between two consecutive anomalous-pixel scores only normal pixels cross the threshold, so the ROC and PRO
    curves are flat there; each step is described by the normal pixels strictly above (`fp_above`) and at or
    above (`fp_at`) the score, which also covers ties between normal and anomalous pixels (diagonal segments).
    """

    thresholds: np.ndarray  # distinct anomalous-pixel scores, descending
    tp: np.ndarray  # anomalous pixels >= threshold
    fp_above: np.ndarray  # normal pixels > threshold
    fp_at: np.ndarray  # normal pixels >= threshold
    pro: np.ndarray  # mean over regions of the region fraction >= threshold
    n_pos: int
    n_neg: int
    n_regions: int

    def _polyline(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        previous_y = np.concatenate(([0.0], y[:-1]))
        x = np.empty(2 * y.size + 2)
        yy = np.empty(2 * y.size + 2)
        x[0], yy[0], x[-1], yy[-1] = 0.0, 0.0, 1.0, 1.0
        x[1:-1:2], yy[1:-1:2] = self.fp_above / self.n_neg, previous_y
        x[2:-1:2], yy[2:-1:2] = self.fp_at / self.n_neg, y
        return x, yy

    def roc(self) -> tuple[np.ndarray, np.ndarray]:
        """(fpr, tpr) polyline from (0, 0) to (1, 1), equal to sklearn's ROC curve as a function."""
        return self._polyline(self.tp / self.n_pos)

    def pro_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(fpr, pro) polyline from (0, 0) to (1, 1), the MVTec PRO curve."""
        return self._polyline(self.pro)


@dataclass
class _PixelData:
    """Normal pixels sorted ascending; anomalous pixels sorted ascending with their region weights."""

    neg_sorted: np.ndarray
    pos_sorted: np.ndarray
    pos_weight: np.ndarray  # 1 / area of the pixel's region, in pos_sorted order
    n_regions: int
    map_min: Any
    map_max: Any

    @property
    def defined(self) -> bool:
        return self.neg_sorted.size > 0 and self.pos_sorted.size > 0


def _iter_pairs(masks: Any, maps: Any) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """(mask (H,W) bool, map (H,W)) per image from arrays (N,H,W) / (H,W) or sequences of them."""
    if isinstance(maps, np.ndarray) or hasattr(maps, "detach"):
        maps = [maps]
        masks = [masks]
    if len(masks) != len(maps):
        raise ValueError(f"{len(masks)} masks for {len(maps)} maps")
    for index, (mask_part, map_part) in enumerate(zip(masks, maps, strict=True)):
        map_arr = _to_numpy(map_part, f"map {index}")
        mask_arr = _to_numpy(mask_part, f"mask {index}")
        if map_arr.ndim == 2:
            map_arr, mask_arr = map_arr[None], mask_arr[None]
        if map_arr.ndim != 3 or mask_arr.shape != map_arr.shape:
            raise ValueError(
                f"mask shape {mask_arr.shape} does not match map shape {map_arr.shape} (item {index})"
            )
        if not np.issubdtype(map_arr.dtype, np.floating):
            map_arr = map_arr.astype(np.float32)
        for mask_img, map_img in zip(mask_arr, map_arr, strict=True):
            yield mask_img > 0.5, map_img


def _gather_pixels(masks: Any, maps: Any) -> _PixelData:
    pairs = list(_iter_pairs(masks, maps))
    if not pairs:
        empty = np.empty(0, np.float32)
        return _PixelData(empty, empty, np.empty(0), 0, math.nan, math.nan)
    dtype = np.result_type(*(m.dtype for _, m in pairs))
    n_neg = sum(int(mask.size - np.count_nonzero(mask)) for mask, _ in pairs)
    neg = np.empty(n_neg, dtype=dtype)  # filled in place: one copy of the normal pixels, no concatenation
    pos_values, pos_weights = [], []
    n_regions, offset = 0, 0
    map_min = map_max = None
    for index, (mask, amap) in enumerate(pairs):
        _check_finite(amap, f"anomaly map {index}")
        low, high = amap.min(), amap.max()
        map_min = low if map_min is None else min(map_min, low)
        map_max = high if map_max is None else max(map_max, high)
        normal = amap[~mask]
        neg[offset : offset + normal.size] = normal
        offset += normal.size
        if mask.any():
            regions, count = ndimage.label(mask, structure=_REGION_STRUCTURE)
            ids = regions[mask]
            areas = np.bincount(ids, minlength=count + 1)
            pos_values.append(amap[mask])
            pos_weights.append(1.0 / areas[ids])
            n_regions += count
    neg.sort()
    pos = np.concatenate(pos_values).astype(dtype, copy=False) if pos_values else np.empty(0, dtype)
    weights = np.concatenate(pos_weights) if pos_weights else np.empty(0)
    order = np.argsort(pos, kind="stable")
    return _PixelData(neg, pos[order], weights[order], n_regions, dtype.type(map_min), dtype.type(map_max))


def _curves(data: _PixelData) -> PixelCurves:
    pos_desc = data.pos_sorted[::-1]
    weight_cum = np.cumsum(data.pos_weight[::-1])
    # last index of each run of equal scores (descending): counts ">= threshold" there
    last = np.flatnonzero(np.append(pos_desc[1:] != pos_desc[:-1], True))
    thresholds = pos_desc[last]
    n_neg = data.neg_sorted.size
    return PixelCurves(
        thresholds=thresholds,
        tp=last + 1,
        fp_above=n_neg - np.searchsorted(data.neg_sorted, thresholds, side="right"),
        fp_at=n_neg - np.searchsorted(data.neg_sorted, thresholds, side="left"),
        pro=np.minimum(weight_cum[last] / data.n_regions, 1.0),
        n_pos=int(data.pos_sorted.size),
        n_neg=n_neg,
        n_regions=data.n_regions,
    )


def _auroc(curves: PixelCurves) -> float:
    # Mann-Whitney U: ties between an anomalous and a normal pixel count one half, as the trapezoidal ROC does.
    tp_step = np.diff(np.concatenate(([0], curves.tp)))
    below = curves.n_neg - curves.fp_at
    ties = curves.fp_at - curves.fp_above
    twice_u = int(np.sum(tp_step * (2 * below + ties), dtype=np.int64))
    return twice_u / (2.0 * curves.n_pos * curves.n_neg)


def _ap_and_f1(curves: PixelCurves) -> tuple[float, float]:
    # Recall only moves at anomalous-pixel scores, so sklearn's AP sum and the F1 maximum live there.
    tp = curves.tp.astype(np.float64)
    precision = tp / (tp + curves.fp_at)
    recall = tp / curves.n_pos
    ap = float(np.sum(np.diff(np.concatenate(([0.0], recall))) * precision))
    return ap, _f1_max(precision, recall)


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under the polyline (x non-decreasing) from x[0] to x_max, interpolating at x_max."""
    inside = int(np.searchsorted(x, x_max, side="right"))
    xs, ys = x[:inside], y[:inside]
    area = float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2))
    if inside < x.size and xs[-1] < x_max:
        y_at = ys[-1] + (y[inside] - ys[-1]) * (x_max - xs[-1]) / (x[inside] - xs[-1])
        area += (x_max - xs[-1]) * (y_at + ys[-1]) / 2
    return area


def _aupro_anomalyclip(data: _PixelData, max_fpr: float, steps: int) -> float:
    # Same arithmetic as the official code (np.arange on the maps' own dtype scalars); counting "> th" by
    # binary search in the sorted pixels instead of binarising every map per threshold.
    delta = (data.map_max - data.map_min) / steps
    if not delta > 0:
        return math.nan
    thresholds = np.arange(data.map_min, data.map_max, delta)
    n_neg = data.neg_sorted.size
    fprs = (n_neg - np.searchsorted(data.neg_sorted, thresholds, side="right")) / n_neg
    weight_cum = np.concatenate(([0.0], np.cumsum(data.pos_weight)))
    below = np.searchsorted(data.pos_sorted, thresholds, side="right")
    pros = (weight_cum[-1] - weight_cum[below]) / data.n_regions
    keep = fprs < max_fpr
    fprs, pros = fprs[keep], pros[keep]
    if fprs.size < 2 or fprs.max() == fprs.min():
        return math.nan
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return float(auc(fprs, pros))


def pixel_curves(masks: Any, maps: Any) -> PixelCurves | None:
    """The exact pixel ROC/PRO curves (for plots); None when there are no anomalous or no normal pixels."""
    data = _gather_pixels(masks, maps)
    return _curves(data) if data.defined else None


def pixel_metrics(masks: Any, maps: Any, *, max_fpr: float = 0.3, pro_steps: int = 200) -> dict[str, float]:
    """Pixel AUROC, AP, F1-max, `aupro` (MVTec) and `aupro_anomalyclip` over all pixels of all images.

    masks: (N,H,W) {0,1} (or a sequence of (H,W)/(B,H,W) arrays); maps: the same shapes, float. All values are
    `nan` when there are no anomalous or no normal pixels.
    """
    data = _gather_pixels(masks, maps)
    if not data.defined:
        return dict.fromkeys(PIXEL_METRICS, math.nan)
    curves = _curves(data)
    ap, f1 = _ap_and_f1(curves)
    fpr, pro = curves.pro_curve()
    return {
        "pixel_auroc": _auroc(curves),
        "pixel_ap": ap,
        "pixel_f1_max": f1,
        "aupro": float(_trapezoid_to(fpr, pro, max_fpr) / max_fpr),
        "aupro_anomalyclip": _aupro_anomalyclip(data, max_fpr, pro_steps),
    }


# --------------------------------------------------------------------------------------------- per category
@dataclass
class _CategoryData:
    labels: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    n_no_mask: int = 0  # anomalous images with a map but no mask: left out of pixel metrics


class MetricAccumulator:
    """Gathers per-image results batch by batch; `compute()` gives (per_category, mean) like `evaluate`.

    Maps are stored as `map_dtype` (float32 by default: exact). A missing mask means "all normal" for a label-0
    image; an anomalous image without a mask is left out of the pixel metrics and counted (`n_no_mask`).
    """

    def __init__(self, *, max_fpr: float = 0.3, pro_steps: int = 200, map_dtype: Any = np.float32) -> None:
        self.max_fpr = max_fpr
        self.pro_steps = pro_steps
        self.map_dtype = np.dtype(map_dtype)
        self._data: dict[str, _CategoryData] = {}
        self._done: dict[str, dict[str, float]] = {}

    @property
    def categories(self) -> list[str]:
        return list(dict.fromkeys([*self._done, *self._data]))

    def add(
        self,
        category: str,
        labels: Any,
        scores: Any,
        maps: Any = None,
        masks: Any = None,
    ) -> None:
        """Add a batch of one category: labels (B,), scores (B,), maps (B,H,W) or None, masks (B,H,W), a
        sequence of (H,W)-or-None, or None. Bad shapes or values raise ValueError naming the category."""
        if category in self._done:
            raise ValueError(
                f"category {category!r} was already computed; add its images before computing it"
            )
        where = f"category {category!r}"
        labels_np = _check_binary_labels(_to_numpy(labels, f"{where} labels"), f"{where} labels")
        scores_np = _to_numpy(scores, f"{where} scores").reshape(-1).astype(np.float64)
        if labels_np.size != scores_np.size:
            raise ValueError(f"{where}: {labels_np.size} labels for {scores_np.size} scores")
        _check_finite(scores_np, f"{where} image scores")
        maps_list = self._split(maps, labels_np.size, f"{where} maps")
        masks_list = self._split(masks, labels_np.size, f"{where} masks")
        for i, (amap, mask) in enumerate(zip(maps_list, masks_list, strict=True)):
            if amap is not None:
                if amap.ndim != 2:
                    raise ValueError(f"{where}: map {i} has shape {amap.shape}, expected (H, W)")
                _check_finite(amap, f"{where} map {i}")
            if amap is not None and mask is not None and mask.shape != amap.shape:
                raise ValueError(f"{where}: mask {i} shape {mask.shape} differs from map shape {amap.shape}")
        data = self._data.setdefault(category, _CategoryData())
        data.labels.extend(labels_np.tolist())
        data.scores.extend(scores_np.tolist())
        for label, amap, mask in zip(labels_np, maps_list, masks_list, strict=True):
            if amap is None:
                continue
            if mask is None:
                if label == 1:
                    data.n_no_mask += 1
                    continue
                mask = np.zeros(amap.shape, dtype=bool)
            data.maps.append(amap.astype(self.map_dtype))
            data.masks.append(mask > 0.5)

    @staticmethod
    def _split(values: Any, count: int, what: str) -> list[np.ndarray | None]:
        if values is None:
            return [None] * count
        if isinstance(values, (list, tuple)):
            items = [None if v is None else _to_numpy(v, what) for v in values]
        else:
            array = _to_numpy(values, what)
            if array.ndim == 2 and count == 1:
                array = array[None]
            items = list(array)
        if len(items) != count:
            raise ValueError(f"{what}: {len(items)} given for {count} images")
        return items

    def compute_category(self, category: str) -> dict[str, float]:
        """Metrics of one category; its stored maps are released (call when a category is finished)."""
        if category in self._done:
            return self._done[category]
        if category not in self._data:
            raise KeyError(f"no images were added for category {category!r}")
        data = self._data.pop(category)
        labels = np.asarray(data.labels, dtype=np.int64)
        result: dict[str, float] = dict(image_metrics(labels, np.asarray(data.scores)))
        if data.maps:
            result.update(
                pixel_metrics(data.masks, data.maps, max_fpr=self.max_fpr, pro_steps=self.pro_steps)
            )
        else:
            result.update(dict.fromkeys(PIXEL_METRICS, math.nan))
        result.update(
            n_images=int(labels.size),
            n_anomalous=int(labels.sum()),
            n_normal=int(labels.size - labels.sum()),
            n_pixel_images=len(data.maps),
            n_no_mask=data.n_no_mask,
        )
        self._done[category] = result
        return result

    def compute(self) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
        """(per_category, mean) over every category added; see `mean_over_categories`."""
        per_category = {category: self.compute_category(category) for category in self.categories}
        return per_category, mean_over_categories(per_category)


def mean_over_categories(per_category: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Mean of each metric over the categories where it is defined.

    Besides the metric means: `n_categories` (total), `n_used` {metric: categories averaged} and `excluded`
    {metric: [categories left out because the metric is undefined there]}.
    """
    mean: dict[str, Any] = {}
    used: dict[str, int] = {}
    excluded: dict[str, list[str]] = {}
    for name in METRIC_NAMES:
        values = {cat: metrics.get(name, math.nan) for cat, metrics in per_category.items()}
        defined = [float(v) for v in values.values() if not math.isnan(v)]
        mean[name] = float(np.mean(defined)) if defined else math.nan
        used[name] = len(defined)
        excluded[name] = [cat for cat, v in values.items() if math.isnan(v)]
    mean["n_categories"] = len(per_category)
    mean["n_used"] = used
    mean["excluded"] = excluded
    return mean


def evaluate(
    records: Iterable[EvalRecord | Sequence[Any]], *, max_fpr: float = 0.3, pro_steps: int = 200
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Per-category metrics and their mean from per-image records (category, label, score, map, mask).

    Categories keep their first-seen order. A record may be an `EvalRecord`, a 5-tuple, or an object with those
    attributes.
    """
    accumulator = MetricAccumulator(max_fpr=max_fpr, pro_steps=pro_steps)
    for index, record in enumerate(records):
        if hasattr(record, "category") and hasattr(record, "score"):
            fields = (record.category, record.label, record.score, record.map, record.mask)
        else:
            fields = tuple(record)
            if len(fields) != 5:
                raise ValueError(
                    f"record {index}: expected (category, label, score, map, mask), got {fields!r:.200}"
                )
        category, label, score, amap, mask = fields
        accumulator.add(
            str(category),
            [label],
            [score],
            maps=None if amap is None else [amap],
            masks=None if mask is None else [mask],
        )
    return accumulator.compute()
