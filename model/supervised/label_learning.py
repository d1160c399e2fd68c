"""`patchcore-head`'s label learning, as the daemon's retraining asks it of a family (`model.factory.LabelLearning`):
the frozen training items of each source (its references leave-one-out as normals, synthetic defects on them, its
labelled defects with their masks or image labels, its frames labelled normal), one head trained on all of them,
and the scorer of a model to compare: PatchCore itself (no head: the base the labels improve on) or a head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from model.dataset_loading import load_image
from model.datasets import Sample
from model.supervised.detector import HeadCheckpoint, PatchcoreHeadDetector
from model.supervised.evaluation import load_training_frames
from model.supervised.training import HeadInputs, HeadTrainingConfig, train_head, training_inputs


def images(paths: Sequence[str | Path], size: int) -> torch.Tensor:
    """Frames as the model input (CLIP-normalised, `size` px squares)."""
    return torch.stack([load_image(Path(p), size, "fast") for p in paths]) if paths else \
        torch.zeros(0, 3, size, size)


def source_inputs(detector: PatchcoreHeadDetector, references: Sequence[Path], labelled: Sequence[Sample], *,
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
    from model.supervised.frames import frame_training_inputs, load_frame, load_training_frames_geometry

    geometry = detector.geometry
    reference_frames = [load_frame(p, geometry, size) for p in references]
    frames, masks, has_mask = load_training_frames_geometry(anomalous, geometry, size, weak=False)
    detector.set_references([frame.unsqueeze(0) for frame in reference_frames])
    buckets, counts = frame_training_inputs(
        detector.patchcore, reference_frames, frames, masks, has_mask,
        synthetic_per_reference=synthetic_per_reference, seed=seed,
        normals=[load_frame(p, geometry, size) for p in normals] or None)
    return [dataclasses.replace(bucket, counts=counts if index == 0 else {})
            for index, bucket in enumerate(buckets)]


def fit(detector: PatchcoreHeadDetector, parts: Sequence[HeadInputs | Sequence[HeadInputs]], *, steps: int,
        seed: int, synthetic_per_reference: int, metadata: dict[str, Any]) -> tuple[HeadCheckpoint, dict[str, Any]]:
    """(the trained head's checkpoint, what trained it: config and item counts) from every source's items (items
    of one grid shape trained together). The checkpoint records the resize mode it was trained on (every source's:
    the job's sources share one; their ROIs may differ): a detector of another mode refuses it."""
    flat = [item for part in parts for item in ([part] if isinstance(part, HeadInputs) else part)]
    by_grid: dict[tuple[int, ...], list[HeadInputs]] = {}
    for item in flat:
        by_grid.setdefault(tuple(item.embeddings.shape[-2:]), []).append(item)
    buckets = [HeadInputs.concat(group) for group in by_grid.values()]
    counts: dict[str, int] = {}
    for bucket in buckets:
        for key, value in bucket.counts.items():
            counts[key] = counts.get(key, 0) + value
    config = HeadTrainingConfig(steps=steps, seed=seed, synthetic_per_reference=synthetic_per_reference)
    head, d0 = train_head(buckets[0] if len(buckets) == 1 else buckets, config)
    checkpoint = HeadCheckpoint(head, d0, {**detector.identity, "geometry": detector.geometry.resize,
                                            **metadata, "training": config.as_dict(), "items": counts})
    return checkpoint, {"training": config.as_dict(), "items": counts}


def scorer(detector: PatchcoreHeadDetector, weights: HeadCheckpoint | None) -> Any:
    """The detector that scores as the model with `weights` does: the head on them, or PatchCore itself (None)."""
    detector.set_checkpoint(weights)
    return detector if weights is not None else detector.patchcore
