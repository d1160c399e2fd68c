"""Evaluation reports and anomaly-map images: metrics.json / metrics.md, ROC and PRO curve plots, overlays.

- `write_report`: the numbers of `model.metrics.evaluate` for one or more models, as JSON (fractions, `null` for
  undefined, with the metric definitions) and as Markdown tables laid out like the AnomalyCLIP paper's (×100, one
  decimal, `n/a` for undefined), plus a side-by-side table of the means when there are several models.
- `plot_curves`: image ROC, pixel ROC and PRO curves of one category as PNGs (matplotlib, Agg backend, imported
  lazily so the daemon does not pay for it unless it plots).
- `heatmap_overlay` / `write_overlay`: the anomaly map as a JET heat map blended on the image, optionally with the
  ground-truth contour; used by the eval report, `anomalyd predict --overlays` and the daemon.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from model.atomic import atomic_write_text
from model.metrics import METRIC_LABELS, METRIC_NAMES, image_metrics, pixel_curves

# Column headers of the Markdown tables, in the papers' order.
COLUMN_TITLES = {
    "image_auroc": "image AUROC",
    "image_ap": "image AP",
    "image_f1_max": "image F1-max",
    "pixel_auroc": "pixel AUROC",
    "pixel_ap": "pixel AP",
    "pixel_f1_max": "pixel F1-max",
    "aupro": "AUPRO",
    "aupro_anomalyclip": "AUPRO (AnomalyCLIP)",
}
PLOT_SIZE_INCHES = 5.0
PLOT_DPI = 100  # PNGs are PLOT_SIZE_INCHES * PLOT_DPI pixels square
_MAX_PLOT_POINTS = 2000  # exact curves can have millions of vertices; plots do not need them
GREEN = (0, 255, 0)


# --------------------------------------------------------------------------------------------- report
def jsonable(value: Any) -> Any:
    """JSON-ready copy: numpy scalars/arrays to Python, nan/inf to None."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _percent(value: Any) -> str:
    if value is None:
        return "n/a"
    value = float(value)
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(first_column: str, rows: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
    header = [first_column, *(COLUMN_TITLES[name] for name in METRIC_NAMES)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * len(METRIC_NAMES)]
    for label, metrics in rows:
        cells = [_cell(label), *(_percent(metrics.get(name)) for name in METRIC_NAMES)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _excluded_note(mean: Mapping[str, Any]) -> str | None:
    excluded = mean.get("excluded") or {}
    by_categories: dict[tuple[str, ...], list[str]] = {}  # metrics with the same left-out categories together
    for name, cats in excluded.items():
        if cats and name in COLUMN_TITLES and len(cats) < mean.get("n_categories", len(cats) + 1):
            by_categories.setdefault(tuple(cats), []).append(COLUMN_TITLES[name])
    parts = [f"{', '.join(names)}: {', '.join(map(_cell, cats))}" for cats, names in by_categories.items()]
    if not parts:
        return None
    return "`mean` leaves out the categories where a metric is undefined (n/a): " + "; ".join(parts) + "."


def _model_order(results: Mapping[str, Any], models: Sequence[str] | Mapping[str, Any] | None) -> list[str]:
    if models is None:
        return list(results)
    order = list(models)
    missing = [name for name in order if name not in results]
    if missing:
        raise ValueError(f"models {missing} have no results (results hold {list(results)})")
    return order


def write_report(
    report_dir: str | Path,
    results: Mapping[str, tuple[Mapping[str, Mapping[str, Any]], Mapping[str, Any]]],
    *,
    models: Sequence[str] | Mapping[str, Any] | None = None,
) -> str:
    """Write `metrics.json` and `metrics.md` into report_dir; return the Markdown.

    results: model name -> (per_category, mean) from `model.metrics.evaluate`. models: which models and in what
    order (default: all, in results' order); a mapping name -> info (e.g. version, backbone) also stores that
    info in metrics.json.
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    order = _model_order(results, models)
    if not order:
        raise ValueError("no model results to report")
    infos = models if isinstance(models, Mapping) else {}

    document = {
        "definitions": {
            **METRIC_LABELS,
            "values": "fractions in [0, 1]; null = undefined (e.g. a category without normal images)",
            "mean": "mean over the categories where the metric is defined; see n_used / excluded",
        },
        "models": {
            name: {
                **({"info": infos[name]} if name in infos else {}),
                "per_category": results[name][0],
                "mean": results[name][1],
            }
            for name in order
        },
    }
    atomic_write_text(
        report_dir / "metrics.json",
        json.dumps(jsonable(document), indent=2, allow_nan=False, ensure_ascii=False) + "\n",
    )

    lines = ["# Evaluation", ""]
    for name in order:
        per_category, mean = results[name]
        lines += [f"## {_cell(name)}", ""]
        lines += _table("category", [*per_category.items(), ("mean", mean)])
        note = _excluded_note(mean)
        lines += ["", *([note, ""] if note else [])]
    if len(order) > 1:
        lines += ["## Models (mean over categories)", ""]
        lines += _table("model", [(name, results[name][1]) for name in order])
        lines.append("")
    lines += [
        "Values ×100. AUPRO: the MVTec definition (PRO integrated over FPR ≤ 0.3, divided by 0.3); "
        "AUPRO (AnomalyCLIP): the official AnomalyCLIP code's variant (200 thresholds, kept FPRs < 0.3 "
        "rescaled to [0, 1]). n/a: undefined.",
        "",
    ]
    markdown = "\n".join(lines)
    atomic_write_text(report_dir / "metrics.md", markdown)
    return markdown


# --------------------------------------------------------------------------------------------- plots
def _thin(x: np.ndarray, y: np.ndarray, limit: int = _MAX_PLOT_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most `limit` vertices, spread evenly along the curve's length so that steep steps keep their shape."""
    if x.size <= limit:
        return x, y
    travelled = np.concatenate(([0.0], np.cumsum(np.abs(np.diff(x)) + np.abs(np.diff(y)))))
    keep = np.unique(np.searchsorted(travelled, np.linspace(0, travelled[-1], limit)).clip(0, x.size - 1))
    return x[keep], y[keep]


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("._") or "category"


def _save_curve(
    path: Path, title: str, xlabel: str, ylabel: str, curve, *, note: str = "", x_limit=None
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # a bare Figure: no pyplot global state, safe off the main thread

    figure = Figure(figsize=(PLOT_SIZE_INCHES, PLOT_SIZE_INCHES), dpi=PLOT_DPI)
    axes = figure.add_subplot()
    if curve is None:
        axes.text(0.5, 0.5, f"n/a: {note}", ha="center", va="center", wrap=True)
    else:
        x, y = _thin(*curve)
        axes.plot(x, y, lw=1.5, label=note)
        axes.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8)
        if x_limit is not None:
            axes.axvline(x_limit, ls="--", color="red", lw=0.8)
        axes.legend(loc="lower right")
    axes.set(xlim=(0, 1), ylim=(0, 1.01), xlabel=xlabel, ylabel=ylabel, title=title)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=PLOT_DPI)
    return path


def plot_curves(
    report_dir: str | Path,
    category: str,
    labels: Any,
    scores: Any,
    masks: Any = None,
    maps: Any = None,
    *,
    max_fpr: float = 0.3,
) -> list[Path]:
    """Image ROC, pixel ROC and PRO curve PNGs of one category; returns the paths written.

    Files: `<category>_image_roc.png`, and with maps and masks `<category>_pixel_roc.png` and `<category>_pro.png`.
    An undefined curve (one class only) is still drawn, as an `n/a` panel saying why.
    """
    from sklearn.metrics import auc, roc_curve

    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    stem = _safe_name(category)
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    image = image_metrics(labels, scores)
    image_curve = None
    if not math.isnan(image["image_auroc"]):
        fpr, tpr, _ = roc_curve(labels, scores)
        image_curve = (fpr, tpr)
    note = f"AUROC {_percent(image['image_auroc'])}" if image_curve else "needs normal and anomalous images"
    written = [
        _save_curve(
            report_dir / f"{stem}_image_roc.png",
            f"{category}: image ROC",
            "FPR",
            "TPR",
            image_curve,
            note=note,
        )
    ]
    if maps is None or masks is None:
        return written
    curves = pixel_curves(masks, maps)
    if curves is None:
        why = "needs normal and anomalous pixels"
        roc = pro = None
        roc_note = pro_note = why
    else:
        roc, pro = curves.roc(), curves.pro_curve()
        roc_note = f"AUROC {_percent(auc(*roc))}"  # the exact pixel AUROC: the polyline is the full curve
        pro_note = f"PRO, {curves.n_regions} regions"
    written.append(
        _save_curve(
            report_dir / f"{stem}_pixel_roc.png", f"{category}: pixel ROC", "FPR", "TPR", roc, note=roc_note
        )
    )
    written.append(
        _save_curve(
            report_dir / f"{stem}_pro.png",
            f"{category}: PRO curve (limit FPR {max_fpr:g})",
            "FPR (normal pixels)",
            "per-region overlap",
            pro,
            note=pro_note,
            x_limit=max_fpr,
        )
    )
    return written


# --------------------------------------------------------------------------------------------- overlays
def _as_rgb8(rgb: Any) -> np.ndarray:
    image = np.asarray(rgb)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) == 0:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {image.shape}")
    return image


def _map_at(
    anomaly_map: Any,
    height: int,
    width: int,
    *,
    name: str = "anomaly map",
    interpolation: int = cv2.INTER_LINEAR,
) -> np.ndarray:
    """float32 (height, width) copy of a 2-D map (leading size-1 axes dropped; torch tensors accepted)."""
    if hasattr(anomaly_map, "detach"):
        anomaly_map = anomaly_map.detach().float().cpu().numpy()
    values = np.asarray(anomaly_map, dtype=np.float32)
    while values.ndim > 2 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"{name} must be 2-D (H, W), got shape {values.shape}")
    if values.shape != (height, width):
        values = cv2.resize(values, (width, height), interpolation=interpolation)
    return values


def heatmap_overlay(
    rgb_uint8: Any,
    anomaly_map: Any,
    *,
    alpha: float = 0.5,
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """The map as a JET heat map (blue low, red high) blended on the image: (H, W, 3) RGB uint8.

    The map is resized (bilinear) to the image; values are scaled from vmin..vmax (default: the map's own
    min..max) to the colormap; NaN counts as vmin. alpha is the heat map's weight.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    image = _as_rgb8(rgb_uint8)
    height, width = image.shape[:2]
    values = _map_at(anomaly_map, height, width)
    finite = np.isfinite(values)
    if vmin is None:
        vmin = float(values[finite].min()) if finite.any() else 0.0
    if vmax is None:
        vmax = float(values[finite].max()) if finite.any() else 1.0
    low, high = float(vmin), float(vmax)
    values = np.where(finite, values, low)
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    levels = np.round(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)
    heat = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(heat, alpha, image, 1.0 - alpha, 0.0)


def write_overlay(
    path: str | Path,
    rgb: Any,
    anomaly_map: Any,
    mask: Any = None,
    *,
    alpha: float = 0.5,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Path:
    """Write `heatmap_overlay` to path (format from the suffix: .png, .jpg, ...), with the ground-truth mask's
    contour in green when a mask is given (resized to the image, nearest). Returns the path."""
    path = Path(path)
    overlay = heatmap_overlay(rgb, anomaly_map, alpha=alpha, vmin=vmin, vmax=vmax)
    if mask is not None:
        height, width = overlay.shape[:2]
        mask_values = _map_at(mask, height, width, name="mask", interpolation=cv2.INTER_NEAREST)
        binary = (mask_values > 0.5).astype(np.uint8)
        contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        thickness = max(1, round(min(height, width) / 256))
        overlay = np.ascontiguousarray(overlay)
        cv2.drawContours(overlay, contours, -1, GREEN, thickness)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        ok = cv2.imwrite(str(path), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
    except cv2.error as exc:
        raise ValueError(f"{path}: cannot write an image there ({exc.msg.strip() or exc})") from exc
    if not ok:
        raise OSError(f"{path}: OpenCV could not write the overlay")
    return path
