"""Training a patchcore-head from a labelled dataset folder (`anomalyd train --model patchcore-head`).

References: the given reference files, else up to `max_references` of the dataset's normal images (a seeded draw
from them sorted by path); the other normal images train as labelled normals, the anomalous ones as labelled
defects (their masks where they have one, else the image label only).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from model.dataset_loading import TransformName, load_image
from model.datasets import DatasetError, Sample
from model.supervised.detector import HeadCheckpoint, PatchcoreHeadDetector, fit_head
from model.supervised.evaluation import load_training_frames
from model.supervised.training import HeadTrainingConfig

MAX_REFERENCES = 16


def fit_samples(detector: PatchcoreHeadDetector, samples: Sequence[Sample], *, output: str | Path, seed: int = 0,
                references: Sequence[str | Path] | None = None, max_references: int = MAX_REFERENCES,
                transform: TransformName = "fast", metadata: dict[str, Any] | None = None) -> HeadCheckpoint:
    """Train `detector`'s head on labelled samples, save the checkpoint to `output` and return it. The frames go
    through the detector's geometry (squash, or fit / ROI; tile: a GeometryError), which the checkpoint records."""
    normals = sorted((s for s in samples if s.label == 0), key=lambda s: str(s.path))
    anomalous = [s for s in samples if s.label == 1]
    if references:
        reference_files = [Path(p) for p in references]
        in_bank = {p.resolve() for p in reference_files}
        others = [s for s in normals if Path(s.path).resolve() not in in_bank]  # the bank's own would score 0
    else:
        if not normals:
            raise DatasetError("patchcore-head needs normal images: none in the data and no --references given")
        chosen = random.Random(seed).sample(normals, min(max_references, len(normals)))
        reference_files = [s.path for s in chosen]
        others = [s for s in normals if s not in chosen]
    size = detector.image_size
    geometry = detector.geometry
    if geometry.plain:
        reference_images: Any = torch.stack([load_image(p, size, transform) for p in reference_files])
        labelled_normals: Any = (torch.stack([load_image(s.path, size, transform) for s in others]) if others
                                 else None)
        frames, masks, has_mask = load_training_frames(anomalous, size, transform, weak=False)
    else:  # fit / ROI (--resize, --roi): each frame and mask cut as the detector's geometry cuts it at inference
        from model.supervised.frames import load_frame, load_training_frames_geometry

        reference_images = [load_frame(p, geometry, size) for p in reference_files]
        labelled_normals = [load_frame(s.path, geometry, size) for s in others] or None
        frames, masks, has_mask = load_training_frames_geometry(anomalous, geometry, size, weak=False)
    checkpoint = fit_head(detector, reference_images, frames, masks, has_mask, HeadTrainingConfig(seed=seed),
                          metadata={"references": [Path(p).name for p in reference_files], **(metadata or {})},
                          normals=labelled_normals)
    checkpoint.save(output)
    return checkpoint
