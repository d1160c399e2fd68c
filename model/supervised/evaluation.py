"""patchcore-head's side of mixed-supervision evaluation (`anomalyd eval --shots K --train-anomalies N`; the split
and the operating point: model/mixed_supervision.py): the labelled defective frames as training tensors, and the
head trained on one category's references and labelled defects (`LabelLearning.few_shot`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model.dataset_loading import TransformName, load_image, load_mask
from model.datasets import Sample


def load_training_frames(samples: Sequence[Sample], image_size: int, transform: TransformName, *, weak: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images (N, 3, S, S), masks (N, S, S), has_mask (N,)) of labelled defective samples; `weak`: no masks."""
    if not samples:
        return torch.zeros(0, 3, image_size, image_size), torch.zeros(0, image_size, image_size), \
            torch.zeros(0, dtype=torch.bool)
    images = torch.stack([load_image(s.path, image_size, transform) for s in samples])
    has_mask = torch.tensor([(not weak) and s.has_mask for s in samples], dtype=torch.bool)
    masks = torch.stack([load_mask(s, image_size) if bool(m) else torch.zeros(image_size, image_size)
                         for s, m in zip(samples, has_mask, strict=True)])
    return images, masks, has_mask


def category_detector(base: object, references: Sequence[Sample], anomalies: Sequence[Sample], *, weak: bool,
                      transform: TransformName, seed: int) -> object:
    """The detector to evaluate on one category (`LabelLearning.few_shot`): a head trained (model/supervised) on the
    references, the labelled defects and synthetic defects, on `base` (a PatchCore, or a head's PatchCore)."""
    from model.supervised.detector import PatchcoreHeadDetector, fit_head
    from model.supervised.training import HeadTrainingConfig

    detector = base if isinstance(base, PatchcoreHeadDetector) else PatchcoreHeadDetector(base)  # type: ignore[arg-type]
    size = detector.image_size
    if detector.geometry.plain:
        reference_images = torch.stack([load_image(s.path, size, transform) for s in references])
        images, masks, has_mask = load_training_frames(anomalies, size, transform, weak=weak)
    else:  # fit / ROI: each frame cut as PatchCore's geometry cuts it, its mask the same way
        from model.supervised.frames import load_frame, load_training_frames_geometry

        reference_images = [load_frame(s.path, detector.geometry, size) for s in references]
        images, masks, has_mask = load_training_frames_geometry(anomalies, detector.geometry, size, weak=weak)
    fit_head(detector, reference_images, images, masks, has_mask, HeadTrainingConfig(seed=seed))
    return detector
