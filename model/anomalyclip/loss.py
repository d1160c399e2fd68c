"""AnomalyCLIP's glocal loss: CE on the global logits + λ · Σ_taps [focal + dice(anomalous) + dice(normal)]
(the focal and dice terms: `model.losses`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model.losses import dice_loss, focal_loss


@dataclass
class GlocalLoss:
    """The loss value with its parts, for logging and the parity tests."""

    total: torch.Tensor
    image: torch.Tensor
    local: torch.Tensor  # already multiplied by λ
    per_tap: list[tuple[float, float, float]] = field(default_factory=list)  # focal, dice, normal dice


def glocal_loss(
    image_logits: torch.Tensor,
    labels: torch.Tensor,
    probabilities: Sequence[torch.Tensor] | None,
    masks: torch.Tensor | None,
    *,
    local_weight: float = 4.0,
    has_mask: torch.Tensor | None = None,
) -> GlocalLoss:
    """image_logits (B, 2); labels (B,); probabilities per tap (B, 2, S, S); masks (B, S, S) in {0, 1}.

    Images without a pixel annotation (has_mask False: image-level labels only) are left out of the local term;
    if none has a mask the loss is the global term alone.
    """
    image = F.cross_entropy(image_logits, labels.long())
    local = image.new_zeros(())
    per_tap: list[tuple[float, float, float]] = []
    if probabilities is not None and masks is not None:
        keep = slice(None)
        if has_mask is not None and not bool(has_mask.all()):
            keep = has_mask.bool()
        if has_mask is None or bool(has_mask.any()):
            target = (masks[keep] > 0.5).to(probabilities[0].dtype)
            for probs in probabilities:
                probs = probs[keep]
                focal = focal_loss(probs, target)
                dice_anomalous = dice_loss(probs[:, 1], target)
                dice_normal = dice_loss(probs[:, 0], 1 - target)
                local = local + focal + dice_anomalous + dice_normal
                per_tap.append((focal.item(), dice_anomalous.item(), dice_normal.item()))
            local = local_weight * local
    return GlocalLoss(total=image + local, image=image, local=local, per_tap=per_tap)
