"""PatchCore's known-good frames for the calibration (daemon/references.py builds them, daemon/calibration.py bounds
them): lightly perturbed views of the held-out references and their leave-one-out scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

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
    """Raw PatchCore scores of known-good frames the bank has not seen: held-out references (each against a bank
    of the others) and their calibration views. `distance_scale` is the median of the held-out references' own
    image scores (d0 of daemon/scale.py; the views do not move it)."""

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


def leave_one_out_scores(model: Any, embeddings: Sequence[Any], image_size: int,
                         limit: int = CALIBRATION_HOLDOUTS, views: Sequence[Any] | None = None,
                         bank_rows: Sequence[Any] | None = None) -> tuple[list[float], list[float]]:
    """Raw PatchCore (image score, map maximum) of up to `limit` reference embeddings, each against a bank of the
    other references' rows (`bank_rows[j]`, default their patches; no coreset), then of `views[i]` (V, 3, S, S
    daemon-normalised images, views of reference i) against the same bank. The model's own bank is restored.
    Empty with fewer than two."""
    import torch

    from model.patchcore import clip_to_tf

    if len(embeddings) < 2:
        return [], []
    saved = (model.memory_bank, model.bank_norms)
    scores: list[float] = []
    maxima: list[float] = []
    try:
        with torch.inference_mode():
            flats = list(bank_rows) if bank_rows is not None else [model.flatten(e) for e in embeddings]
            for held_out in range(min(limit, len(embeddings))):
                model.set_memory_bank(torch.cat([f for j, f in enumerate(flats) if j != held_out]))
                batches = [embeddings[held_out]]
                if views is not None and len(views[held_out]):
                    device = embeddings[held_out].device
                    batches.append(model.embed(clip_to_tf(views[held_out].to(device).float())).float())
                for embedding in batches:
                    patch, where, flat = model.patch_scores(embedding)
                    scores += model.image_scores(patch, where, flat).tolist()
                    maps = model.anomaly_maps(patch, tuple(embedding.shape[-2:]), (image_size, image_size))
                    maxima += maps.flatten(1).amax(1).tolist()
    finally:
        model.memory_bank, model.bank_norms = saved
    return scores, maxima
