"""Known-good scores of a `patchcore-head` source detector for its calibration (the family's `known_good` hook,
model/known_good.py): like PatchCore's (model/patchcore/known_good.py), each held-out reference and its calibration
views scored against a bank of the other references, but through the head, so on the head's own 0–1 scale. The head
was trained with the references scored the same way (leave-one-out), so these are the scores an unseen good frame
gets.

Those known-good frames are frames the head learned as normal (the references, the frames labelled normal), so
they understate how high an unseen good frame scores: measured on metal_plate (8 references, 128 px), they put
the threshold near 0.0001 while 10 of 40 unseen good frames scored above it. The head's threshold is therefore at
least its trained decision boundary (class-balanced BCE), which the family declares as
`Capabilities.threshold_floor` (model/factory.py; daemon/references/calibration.py applies it with `floored`); the rule in the
threshold history says so. A good frame that still alerts is what a labelled false alarm and the next retraining
fix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model.known_good import CALIBRATION_HOLDOUTS, DEFAULT_DISTANCE_SCALE, KnownGoodScores, calibration_views


def _rows(detector: Any, files: Sequence[Path]) -> list[Any]:
    """Per reference the memory-bank rows it gives the live bank (with its augmented views when the bank has them)."""
    import torch

    from model.patchcore import augment_references, clip_to_tf
    from model.preprocess import decode_image, fast_transform

    patchcore = detector.patchcore
    model, size = patchcore.model, int(patchcore.image_size)
    augment = str(getattr(patchcore, "augment", "none"))
    rows = []
    with torch.inference_mode():
        for path in files:
            image = fast_transform(decode_image(path), size)[None].to(patchcore.device).float()
            if augment != "none":
                image = augment_references(image, augment)
            rows.append(model.flatten(model.embed(clip_to_tf(image)).float()))
    return rows


class _HeadThroughPatchcore:
    """The head detector as PatchCore's `geometry_known_good` reads one: PatchCore's model (bank rows, embeddings),
    geometry and options, the head's predictions."""

    def __init__(self, detector: Any) -> None:
        patchcore = detector.patchcore
        self.model, self.geometry, self.image_size = patchcore.model, patchcore.geometry, patchcore.image_size
        self.device, self.batch_size = patchcore.device, patchcore.batch_size
        self.augment = getattr(patchcore, "augment", "none")
        self.predict = detector.predict


def head_known_good(detector: Any, files: Sequence[Path], limit: int = CALIBRATION_HOLDOUTS) -> KnownGoodScores:
    """Scores and map maxima (0–1) of up to `limit` held-out references and their calibration views, each against
    a bank of the other references; the detector's own bank is restored. Empty with fewer than two files."""
    import torch

    from model.preprocess import decode_image, fast_transform

    if len(files) < 2:
        return KnownGoodScores([], [], DEFAULT_DISTANCE_SCALE, 0, 0)
    if not detector.geometry.plain:  # fit / ROI / ignore polygons: through the same geometry, as PatchCore's
        from model.patchcore.known_good import geometry_known_good

        return geometry_known_good(_HeadThroughPatchcore(detector), files, limit)
    model = detector.patchcore.model
    size = int(detector.image_size)
    rows = _rows(detector, files)
    held_out = min(limit, len(files))
    scores: list[float] = []
    maxima: list[float] = []
    own: list[float] = []
    views = 0
    saved = (model.memory_bank, model.bank_norms)
    try:
        for index in range(held_out):
            rgb = decode_image(files[index])
            images = torch.stack([fast_transform(view, size) for view in [rgb, *calibration_views(rgb)]])
            model.set_memory_bank(torch.cat([r for j, r in enumerate(rows) if j != index]))
            prediction = detector.predict(images)
            values = prediction.scores.float().cpu().tolist()
            scores += values
            maxima += prediction.maps.float().cpu().flatten(1).amax(1).tolist()
            own.append(values[0])
            views += len(values) - 1
    finally:
        model.memory_bank, model.bank_norms = saved
    return KnownGoodScores(scores, maxima, float(np.median(own)), held_out, views, own)
