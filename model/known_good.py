"""Known-good frames for a source's calibration, family-neutral: the lightly perturbed views of held-out references
(`calibration_views`) and the scores a family gives them (`KnownGoodScores`). A family that keeps references
computes its own through its `ModelFamily.known_good` hook (PatchCore: model/patchcore/known_good.py); the daemon
caches them (daemon/references/known_good_cache.py) and bounds the threshold from them (daemon/references/calibration.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CALIBRATION_HOLDOUTS = 8

# Known-good views for the calibration: live frames of a fixed camera differ from the references by small shifts,
# turns and exposure changes that the leave-one-out scores of the references alone do not show, so each held-out
# reference is also scored shifted by CALIBRATION_SHIFT of its size each way along each axis, turned by
# ±CALIBRATION_DEGREES and CALIBRATION_GAIN brighter and darker (bench/calibration_patchcore.py measures the rule).
CALIBRATION_SHIFT = 0.02
CALIBRATION_DEGREES = 5.0
CALIBRATION_GAIN = 0.05


def calibration_views(rgb: np.ndarray, *, shift: float = CALIBRATION_SHIFT, degrees: float = CALIBRATION_DEGREES,
                      gain: float = CALIBRATION_GAIN) -> list[np.ndarray]:
    """Lightly perturbed copies of an RGB frame (H, W, 3): 4 shifts, 2 turns (reflected borders), 2 exposures."""
    import cv2

    height, width = rgb.shape[:2]
    views = []
    for dx, dy in ((shift, 0.0), (-shift, 0.0), (0.0, shift), (0.0, -shift)):
        matrix = np.float32([[1, 0, dx * width], [0, 1, dy * height]])
        views.append(cv2.warpAffine(rgb, matrix, (width, height), borderMode=cv2.BORDER_REFLECT_101))
    for angle in (degrees, -degrees):
        matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
        views.append(cv2.warpAffine(rgb, matrix, (width, height), borderMode=cv2.BORDER_REFLECT_101))
    for factor in (1 + gain, 1 - gain):
        views.append(np.clip(np.rint(rgb.astype(np.float32) * factor), 0, 255).astype(np.uint8))
    return views


# PatchCore's distance scale when it cannot be measured (one reference, a saved bank): a typical leave-one-out
# image score of EfficientNet-Lite0 at 256 px on the shared samples (cubes: 15-27).
DEFAULT_DISTANCE_SCALE = 20.0


@dataclass
class KnownGoodScores:
    """Raw scores of known-good frames the bank has not seen: held-out references (each against a bank of the
    others) and their calibration views. `distance_scale` is the median of the held-out references' own image
    scores (d0 of daemon/detectors/scale.py; the views do not move it)."""

    scores: list[float]
    maxima: list[float]
    distance_scale: float
    held_out: int
    views: int
    own: list[float] = field(default_factory=list)  # the held-out references' own image scores (no views)
    own_files: list[str] = field(default_factory=list)  # their file names, in `own`'s order (the UI shows them)

    def describe(self) -> str:
        text = f"leave-one-out on {self.held_out} references"
        return text + (f" and {self.views} shifted/turned/exposed views of them" if self.views else "")
