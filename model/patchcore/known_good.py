"""PatchCore's known-good scores for the daemon's calibration (its `ModelFamily.known_good` hook): each of up to
`limit` held-out references, and its calibration views (model/known_good.py), scored against a bank of the other
references' rows, built as the live bank is (with its augmented views; through the frame geometry when the detector
has one). One embedding pass over the references instead of a bank per held-out one; the detector's own bank is
restored. Pure PyTorch/numpy: the daemon reaches this through the family, never by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.geometry import frame_inputs, predict_frames
from model.known_good import CALIBRATION_HOLDOUTS, DEFAULT_DISTANCE_SCALE, KnownGoodScores, calibration_views
from model.patchcore.detector import augment_references, clip_to_tf
from model.preprocess import decode_image, fast_transform


def leave_one_out_scores(model: Any, embeddings: Sequence[Any], image_size: int,
                         limit: int = CALIBRATION_HOLDOUTS, views: Sequence[Any] | None = None,
                         bank_rows: Sequence[Any] | None = None) -> tuple[list[float], list[float]]:
    """Raw PatchCore (image score, map maximum) of up to `limit` reference embeddings, each against a bank of the
    other references' rows (`bank_rows[j]`, default their patches; no coreset), then of `views[i]` (V, 3, S, S
    daemon-normalised images, views of reference i) against the same bank. The model's own bank is restored.
    Empty with fewer than two."""
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


def patchcore_embeddings(detector: Any, files: Sequence[Path]) -> list[Any]:
    """PatchCore patch embeddings (1, D, h, w) of image files through the daemon's preprocessing."""
    size = int(detector.image_size)
    with torch.inference_mode():
        return [detector.model.embed(clip_to_tf(fast_transform(decode_image(f), size)[None].to(detector.device)
                                                .float())).float() for f in files]


def patchcore_bank_rows(detector: Any, files: Sequence[Path], embeddings: Sequence[Any]) -> list[Any]:
    """Per reference the memory-bank rows it gives the live bank: its patches, with its augmented views when the
    detector augments references ([model].augment)."""
    model, augment = detector.model, str(getattr(detector, "augment", "none"))
    if augment == "none":
        return [model.flatten(e) for e in embeddings]
    size = int(detector.image_size)
    with torch.inference_mode():
        return [model.flatten(model.embed(clip_to_tf(augment_references(
            fast_transform(decode_image(f), size)[None].to(detector.device).float(), augment))).float())
            for f in files]


def patchcore_known_good(detector: Any, files: Sequence[Path], limit: int = CALIBRATION_HOLDOUTS,
                         embeddings: Sequence[Any] | None = None) -> KnownGoodScores:
    """Leave-one-out scores of up to `limit` references and of their calibration views (`calibration_views`):
    one embedding pass over the references instead of a bank per held-out one. `embeddings` (one per file, as
    `patchcore_embeddings` gives) saves that pass when the caller has them. Empty with fewer than two files."""
    if len(files) < 2:
        return KnownGoodScores([], [], DEFAULT_DISTANCE_SCALE, 0, 0)
    if getattr(detector, "geometry", None) is not None and not detector.geometry.plain:
        return geometry_known_good(detector, files, limit)  # fit / tile / ROI: through the same geometry
    size = int(detector.image_size)
    if embeddings is None:
        embeddings = patchcore_embeddings(detector, files)
    held_out = min(limit, len(files))
    # the bank holds the other references as the live bank does: with their augmented views
    rows = patchcore_bank_rows(detector, files, embeddings)
    views = [torch.stack([fast_transform(v, size) for v in calibration_views(decode_image(f))])
             for f in files[:held_out]]
    scores, maxima = leave_one_out_scores(detector.model, embeddings, size, limit, views, rows)
    # per held-out reference its own score comes first, then its views' scores
    firsts = np.cumsum([0] + [1 + len(v) for v in views[:-1]])
    own = [scores[i] for i in firsts]
    return KnownGoodScores(scores, maxima, float(np.median(own)), held_out, sum(len(v) for v in views), own)


def geometry_known_good(detector: Any, files: Sequence[Path], limit: int = CALIBRATION_HOLDOUTS
                        ) -> KnownGoodScores:
    """`patchcore_known_good` for a detector with a geometry: each of up to `limit` references
    and its calibration views scored through the geometry against a bank of the other references' rows (their
    inputs cut the same way, augmented as the live bank is); the detector's own bank is restored."""
    if len(files) < 2:
        return KnownGoodScores([], [], DEFAULT_DISTANCE_SCALE, 0, 0)
    model, geometry, size = detector.model, detector.geometry, int(detector.image_size)
    frames = [decode_image(f) for f in files]
    with torch.inference_mode():
        rows = []
        for rgb in frames:
            views = augment_references(frame_inputs(rgb, geometry, size), str(getattr(detector, "augment", "none")))
            rows.append(torch.cat([model.flatten(model.embed(clip_to_tf(views[i:i + 8].to(detector.device)))).float()
                                   for i in range(0, views.shape[0], 8)]))
    saved = (model.memory_bank, model.bank_norms)
    scores: list[float] = []
    maxima: list[float] = []
    own: list[float] = []
    held_out = min(limit, len(files))
    n_views = 0
    try:
        for index in range(held_out):
            model.set_memory_bank(torch.cat([r for j, r in enumerate(rows) if j != index]))
            views = calibration_views(frames[index])
            n_views += len(views)
            frame_scores, frame_maps = predict_frames(detector, [frames[index], *views], geometry,
                                                      batch_size=int(getattr(detector, "batch_size", 8)))
            own.append(float(frame_scores[0]))
            scores += [float(s) for s in frame_scores]
            maxima += [float(m.max()) for m in frame_maps]
    finally:
        model.memory_bank, model.bank_norms = saved
    return KnownGoodScores(scores, maxima, float(np.median(own)), held_out, n_views, own)
