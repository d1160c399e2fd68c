"""The segmentation losses the families share (AnomalyCLIP's glocal loss and AdaCLIP's loss are built on them).

The focal and dice terms follow AnomalyCLIP's official loss.py (focal with γ=2, α=1, one-hot clamped to [1e-5, 1-1e-5],
pt = Σ onehot·p + 1e-5, mean over all pixels; dice per image (2Σpm + 1)/(Σp + Σm + 1), 1 - batch mean).
"""

from __future__ import annotations

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
