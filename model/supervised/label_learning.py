"""`patchcore-head`'s label learning, as the daemon's retraining asks it of a family (`model.factory.LabelLearning`):
the frozen training items of each source (its references leave-one-out as normals, synthetic defects on them, its
labelled defects with their masks or image labels, its frames labelled normal), tagged with the source's resize
mode; one head per resize mode trained on the items of that mode's sources (one mode: a single-head file as
before; several: a `HeadSet`, model/supervised/head_set.py); and the scorer of a model to compare on a source:
PatchCore itself (no head, or none for the source's mode: the base the labels improve on) or the head of its mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from model.dataset_loading import load_image
from model.datasets import Sample
from model.supervised.checkpoint import HeadCheckpoint
from model.supervised.detector import PatchcoreHeadDetector
from model.supervised.evaluation import load_training_frames
from model.supervised.head_set import HeadSet, head_for
from model.supervised.training import HeadInputs, HeadTrainingConfig, train_head, training_inputs


def images(paths: Sequence[str | Path], size: int) -> torch.Tensor:
    """Frames as the model input (CLIP-normalised, `size` px squares)."""
    return torch.stack([load_image(Path(p), size, "fast") for p in paths]) if paths else \
        torch.zeros(0, 3, size, size)


@dataclasses.dataclass
class ModeInputs:
    """One source's frozen training items and the resize mode they were cut for (a head learns one mode)."""

    resize: str
    items: list[HeadInputs]


def source_inputs(detector: PatchcoreHeadDetector, references: Sequence[Path], labelled: Sequence[Sample], *,
                  synthetic_per_reference: int, seed: int) -> ModeInputs:
    """The source's items (`_source_items`) tagged with its resize mode."""
    return ModeInputs(detector.geometry.resize, _source_items(detector, references, labelled,
                                                              synthetic_per_reference=synthetic_per_reference,
                                                              seed=seed))


def _source_items(detector: PatchcoreHeadDetector, references: Sequence[Path], labelled: Sequence[Sample], *,
                  synthetic_per_reference: int, seed: int) -> list[HeadInputs]:
    """One source's frozen training items (one HeadInputs per grid shape): its bank built on `references`, then its
    labelled frames scored by it; every frame cut through the detector's geometry (the source's: squash, or fit
    with each frame's own shape, its ROI), masks cut the same way (model/supervised/frames.py)."""
    size = detector.image_size
    anomalous = [s for s in labelled if s.label]
    normals = [s.path for s in labelled if not s.label]
    if detector.geometry.plain:
        refs = images(references, size)
        anomalies, masks, has_mask = load_training_frames(anomalous, size, "fast", weak=False)
        detector.set_references(refs)
        return [training_inputs(detector.patchcore, refs, anomalies, masks, has_mask,
                                synthetic_per_reference=synthetic_per_reference, seed=seed,
                                normals=images(normals, size) if normals else None)]
    from model.supervised.frames import (
        as_batches,
        frame_training_inputs,
        load_frame,
        load_training_frames_geometry,
    )

    geometry = detector.geometry
    reference_frames = [load_frame(p, geometry, size) for p in references]
    frames, masks, has_mask = load_training_frames_geometry(anomalous, geometry, size, weak=False)
    detector.set_references(as_batches(reference_frames))
    buckets, counts = frame_training_inputs(
        detector.patchcore, reference_frames, frames, masks, has_mask,
        synthetic_per_reference=synthetic_per_reference, seed=seed,
        normals=[load_frame(p, geometry, size) for p in normals] or None)
    return [dataclasses.replace(bucket, counts=counts if index == 0 else {})
            for index, bucket in enumerate(buckets)]


def fit(detector: PatchcoreHeadDetector, parts: Sequence[ModeInputs | HeadInputs | Sequence[HeadInputs]], *,
        steps: int, seed: int, synthetic_per_reference: int, metadata: dict[str, Any]
        ) -> tuple[HeadCheckpoint | HeadSet, dict[str, Any]]:
    """(the trained weights, what trained them: config, item counts, per mode) from every source's items: one head
    per resize mode (items untagged: the detector's), each recording the mode it was trained on (a detector of
    another mode refuses it). One mode: its `HeadCheckpoint`; several: a `HeadSet` of them."""
    by_mode: dict[str, list[HeadInputs]] = {}
    for part in parts:
        if isinstance(part, ModeInputs):
            by_mode.setdefault(part.resize, []).extend(part.items)
        else:
            by_mode.setdefault(detector.geometry.resize, []).extend([part] if isinstance(part, HeadInputs) else part)
    config = HeadTrainingConfig(steps=steps, seed=seed, synthetic_per_reference=synthetic_per_reference)
    heads: dict[str, HeadCheckpoint] = {}
    per_mode: dict[str, dict[str, int]] = {}
    for mode, items in sorted(by_mode.items()):
        head, d0, counts = _train_mode(items, config)
        per_mode[mode] = counts
        heads[mode] = HeadCheckpoint(head, d0, {**detector.identity, "geometry": mode, **metadata,
                                                "training": config.as_dict(), "items": counts})
    total: dict[str, int] = {}
    for counts in per_mode.values():
        for key, value in counts.items():
            total[key] = total.get(key, 0) + value
    trained = {"training": config.as_dict(), "items": total, "heads": per_mode}
    if len(heads) == 1:
        return next(iter(heads.values())), trained
    return HeadSet(heads, {**detector.identity, **metadata, "training": config.as_dict(), "items": total}), trained


def _train_mode(items: Sequence[HeadInputs], config: HeadTrainingConfig) -> tuple[Any, float, dict[str, int]]:
    """(head, d0, item counts) of one mode's items (items of one grid shape trained together)."""
    by_grid: dict[tuple[int, ...], list[HeadInputs]] = {}
    for item in items:
        by_grid.setdefault(tuple(item.embeddings.shape[-2:]), []).append(item)
    buckets = [HeadInputs.concat(group) for group in by_grid.values()]
    counts: dict[str, int] = {}
    for bucket in buckets:
        for key, value in bucket.counts.items():
            counts[key] = counts.get(key, 0) + value
    head, d0 = train_head(buckets[0] if len(buckets) == 1 else buckets, config)
    return head, d0, counts


def scorer(detector: PatchcoreHeadDetector, weights: HeadCheckpoint | HeadSet | None) -> Any:
    """The detector that scores as the model with `weights` does on the detector's geometry: the head of its resize
    mode, or PatchCore itself (no weights, or none for that mode: what the daemon runs such a source on)."""
    checkpoint = head_for(weights, detector.geometry.resize)
    detector.set_checkpoint(checkpoint)
    return detector if checkpoint is not None else detector.patchcore
