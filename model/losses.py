"""AnomalyCLIP's glocal loss: CE on the global logits + λ · Σ_taps [focal + dice(anomalous) + dice(normal)].

The focal and dice terms follow the official loss.py (focal with γ=2, α=1, one-hot clamped to [1e-5, 1-1e-5],
pt = Σ onehot·p + 1e-5, mean over all pixels; dice per image (2Σpm + 1)/(Σp + Σm + 1), 1 - batch mean).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

FOCAL_SMOOTH = 1e-5


def focal_loss(probabilities: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """probabilities (B, C, H, W) summing to 1 over C; target (B, H, W) with class indices."""
    channels = probabilities.shape[1]
    flat = probabilities.permute(0, 2, 3, 1).reshape(-1, channels)
    one_hot = F.one_hot(target.reshape(-1).long(), channels).to(flat.dtype)
    one_hot = one_hot.clamp(FOCAL_SMOOTH / (channels - 1), 1.0 - FOCAL_SMOOTH)
    pt = (one_hot * flat).sum(dim=1) + FOCAL_SMOOTH
    return (-torch.pow(1.0 - pt, gamma) * pt.log()).mean()


def dice_loss(probability: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """probability, target (B, H, W): 1 - mean over images of (2Σpm + 1) / (Σp + Σm + 1)."""
    batch = target.shape[0]
    p = probability.reshape(batch, -1)
    m = target.reshape(batch, -1)
    dice = (2 * (p * m).sum(1) + 1) / (p.sum(1) + m.sum(1) + 1)
    return 1 - dice.sum() / batch


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
