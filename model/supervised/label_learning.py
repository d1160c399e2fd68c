"""`patchcore-head`'s label learning, as the daemon's retraining asks it of a family (`model.factory.LabelLearning`):
the frozen training items of each source (its references leave-one-out as normals, synthetic defects on them, its
labelled defects with their masks or image labels, its frames labelled normal), one head trained on all of them,
and the scorer of a model to compare: PatchCore itself (no head: the base the labels improve on) or a head.
"""

from __future__ import annotations

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
                  synthetic_per_reference: int, seed: int) -> HeadInputs:
    """One source's frozen training items: its bank built on `references`, then its labelled frames scored by it."""
    size = detector.image_size
    refs = images(references, size)
    anomalies, masks, has_mask = load_training_frames([s for s in labelled if s.label], size, "fast", weak=False)
    normals = [s.path for s in labelled if not s.label]
    detector.set_references(refs)
    return training_inputs(detector.patchcore, refs, anomalies, masks, has_mask,
                           synthetic_per_reference=synthetic_per_reference, seed=seed,
                           normals=images(normals, size) if normals else None)


def fit(detector: PatchcoreHeadDetector, parts: Sequence[HeadInputs], *, steps: int, seed: int,
        synthetic_per_reference: int, metadata: dict[str, Any]) -> tuple[HeadCheckpoint, dict[str, Any]]:
    """(the trained head's checkpoint, what trained it: config and item counts) from every source's items."""
    inputs = HeadInputs.concat(list(parts))
    config = HeadTrainingConfig(steps=steps, seed=seed, synthetic_per_reference=synthetic_per_reference)
    head, d0 = train_head(inputs, config)
    checkpoint = HeadCheckpoint(head, d0, {**detector.identity, **metadata, "training": config.as_dict(),
                                            "items": inputs.counts})
    return checkpoint, {"training": config.as_dict(), "items": inputs.counts}


def scorer(detector: PatchcoreHeadDetector, weights: HeadCheckpoint | None) -> Any:
    """The detector that scores as the model with `weights` does: the head on them, or PatchCore itself (None)."""
    detector.set_checkpoint(weights)
    return detector if weights is not None else detector.patchcore
