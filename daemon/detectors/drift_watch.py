"""The drift watch of a source scored against references (PatchCore), so a line change is still one event after the
source left mutual scoring (daemon/zero_label/start.py) or started with references.

Mutual scoring watches its own window (model/drift.py). A PatchCore source has no window, but the same
statistic applies to its map: the share of a frame's map above the normal level, fed to the same CUSUM
(`DriftWatch`; its own constants, below; every frame counts, alerted or not: the threshold lives in the writer).
The normal level is the median map maximum of the source's known-good frames the bank has not seen (its held-out
references and their calibration views, `known_good.maxima`, computed at build for the calibration anyway): the
highest point of a typical normal frame, so a normal live frame has almost nothing above it, a defect its own area,
and a change of the whole frame most of it. The routed detector (daemon/detectors/routing.py) adds the watch's per-frame
notes to the source's predictions; the result writer turns them into drift events (daemon/zero_label/drift.py) exactly as for
mutual scoring.

A source without held-out known-good scores (fewer than two references, a bank file alone, a patchcore-head whose
scores go through its head) or with a fit/tile/ROI geometry (maps in each frame's pixels) is not watched.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch

from model.drift import DriftWatch
from model.factory import capabilities_of

ATTRIBUTE = "reference_drift_watch"  # where a source's detector keeps its watch (one per built detector)
# The level is a normal frame's maximum, so a normal frame has ~0 % above it (mutual's level: ~5 %); a frame adds to
# the sum above 10 %, at most 0.25 (so at least 3 frames), and the sum signals at 0.6 (measured: docs/models.md,
# bench/drift_cases.py).
EXPECTED, ALLOWANCE, LIMIT, CAP = 0.0, 0.10, 0.6, 0.35
# A drift ends after 3 normal-looking frames in a row, not 1: it holds no alert back here, so the hysteresis costs
# nothing, and a stream alternating products against one product's references is one drift, not one every 3-4 frames.
END_AFTER = 3


class ReferenceDriftWatch:
    """Page's CUSUM on the share of each frame's 0-1 map above `level` (the normal level on the daemon's scale)."""

    def __init__(self, level: float) -> None:
        self.watch = DriftWatch(expected=EXPECTED, allowance=ALLOWANCE, limit=LIMIT, cap=CAP, end_after=END_AFTER)
        self.watch.level = float(level)

    @property
    def level(self) -> float:
        return float(self.watch.level or 0.0)

    def notes(self, maps: torch.Tensor) -> list[dict[str, Any]]:
        """One note per map (B, H, W), in order, as mutual scoring gives them (every frame decided)."""
        return [{"decided": True, **self.watch.note(frame_map.detach().float().cpu().flatten())} for frame_map in maps]


def normal_map_level(detector: Any) -> float | None:
    """The watch's normal level for `detector` on the daemon's scale, or None when it has no usable known-good
    scores (see the module docstring)."""
    known = getattr(detector, "known_good", None)
    maxima = [float(m) for m in getattr(known, "maxima", None) or () if math.isfinite(float(m))]
    scale = getattr(detector, "distance_scale", None)
    if len(maxima) < 2 or not scale or capabilities_of(detector).threshold_floor is not None:
        return None
    return 1.0 - math.exp(-statistics.median(maxima) / float(scale))  # raw distance → 0-1 (daemon/detectors/scale.py)


def reference_watch(detector: Any) -> ReferenceDriftWatch | None:
    """The watch of a source's reference detector, made on first use; None when it cannot be watched."""
    watch = getattr(detector, ATTRIBUTE, None)
    if watch is not None:
        return watch
    if not getattr(getattr(detector, "geometry", None), "plain", True):
        return None
    level = normal_map_level(detector)
    if level is None:
        return None
    watch = ReferenceDriftWatch(level)
    setattr(detector, ATTRIBUTE, watch)
    return watch


def with_drift_notes(detector: Any, prediction: Any) -> Any:
    """`prediction` with the reference watch's per-frame notes when `detector` is watched (a prediction that has
    notes already, mutual scoring's, is returned as it is)."""
    if getattr(prediction, "notes", None) is not None:
        return prediction
    watch = reference_watch(detector)
    if watch is None or getattr(prediction, "maps", None) is None or prediction.maps.ndim != 3:
        return prediction
    return type(prediction)(scores=prediction.scores, maps=prediction.maps, notes=watch.notes(prediction.maps))
