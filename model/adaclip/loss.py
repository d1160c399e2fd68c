"""AdaCLIP's loss: focal on the image probabilities + per tap focal and dice on the segmentation maps."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.adaclip.model import AdaCLIP, AdaCLIPOutput
from model.losses import dice_loss, focal_loss


@dataclass
class AdaCLIPLoss:
    """The loss with its parts, for logging and the parity tests."""

    total: torch.Tensor
    classification: torch.Tensor
    segmentation: torch.Tensor
    per_tap: list[tuple[float, float, float]] = field(default_factory=list)  # focal, dice, normal dice


def adaclip_loss(
    model: AdaCLIP,
    output: AdaCLIPOutput,
    labels: torch.Tensor,
    masks: torch.Tensor | None,
    *,
    has_mask: torch.Tensor | None = None,
) -> AdaCLIPLoss:
    """focal(image probs, label) + Σ_taps [focal(p, m) + dice(p_a, m) + dice(p_n, 1 - m)].

    labels (B,) in {0, 1}; masks (B, S, S) thresholded at 0.5. Images without a pixel annotation (has_mask False)
    are left out of the segmentation term. Dice is per image, as in the golden fixture (the official batch-1
    path squeezes the mask batch, which can turn its dice into a mean over image rows).
    """
    probs = output.image_probs
    target = (labels.to(probs.device).float() > 0.5).long()
    classification = focal_loss(probs.reshape(*probs.shape, 1, 1), target.view(-1, 1, 1))
    segmentation = probs.new_zeros(())
    per_tap: list[tuple[float, float, float]] = []
    if masks is not None and (has_mask is None or bool(has_mask.any())):
        keep = slice(None) if has_mask is None else has_mask.to(probs.device).bool()
        gt = (masks.to(probs.device)[keep].float() > 0.5).float()
        for tap in model.tap_probabilities(output):
            tap = tap[keep].float()
            focal = focal_loss(tap, gt)
            dice_anomalous = dice_loss(tap[:, 1], gt)
            dice_normal = dice_loss(tap[:, 0], 1 - gt)
            segmentation = segmentation + focal + dice_anomalous + dice_normal
            per_tap.append((focal.item(), dice_anomalous.item(), dice_normal.item()))
    return AdaCLIPLoss(total=classification + segmentation, classification=classification,
                       segmentation=segmentation, per_tap=per_tap)
