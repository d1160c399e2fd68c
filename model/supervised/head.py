"""The learned head on PatchCore: a small convolutional net over the frozen patch embedding and the PatchCore
distance, whose logit is a residual on a positive affine map of that distance.

    logit(cell) = exp(log_scale) · (log(1 + z) - offset) + residual(embedding, z),   z = PatchCore distance / d0

The residual's last convolution starts at zero, so an untrained head is a strictly increasing function of the
PatchCore distance: it ranks cells (and, through the same pooling, images) exactly as PatchCore's map does. Labels
move it away from that only where they show PatchCore wrong. Everything runs on the first tap's grid (stride 8):
32 x 32 cells at 256 px.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN = 32
TOP_K = 8  # cells averaged for the image logit: robust to one noisy cell, still sensitive to thin defects
INITIAL_OFFSET = 1.1  # log(1 + z) at z = 2 d0 (d0: the references' median leave-one-out distance)


class PatchcoreHead(nn.Module):
    """(embedding (B, D, h, w), distance / d0 (B, h, w)) → cell logits (B, h, w)."""

    def __init__(self, channels: int, hidden: int = HIDDEN, top_k: int = TOP_K, kernel: int = 3) -> None:
        super().__init__()
        if kernel not in (1, 3):
            raise ValueError(f"head kernel {kernel}: expected 1 or 3")
        self.channels = int(channels)
        self.hidden = int(hidden)
        self.top_k = int(top_k)
        self.kernel = int(kernel)
        # Per-channel statistics of normal patches (set from the training normals) so that the head sees
        # standardised features whatever the taps' scales.
        self.register_buffer("feature_mean", torch.zeros(self.channels))
        self.register_buffer("feature_std", torch.ones(self.channels))
        self.reduce = nn.Conv2d(self.channels, self.hidden, 1)
        self.body = nn.Sequential(
            nn.Conv2d(self.hidden + 1, self.hidden, kernel, padding=kernel // 2), nn.ReLU(),
            nn.Conv2d(self.hidden, self.hidden, kernel, padding=kernel // 2), nn.ReLU(),
        )
        self.out = nn.Conv2d(self.hidden, 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.log_scale = nn.Parameter(torch.zeros(()))
        self.offset = nn.Parameter(torch.tensor(INITIAL_OFFSET))

    def set_feature_statistics(self, embeddings: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Standardise with the per-channel mean/std of `embeddings` (N, D, h, w) (normal frames), or of several
        such tensors of different grids (fit geometry)."""
        groups = [embeddings] if isinstance(embeddings, torch.Tensor) else list(embeddings)
        flat = torch.cat([e.transpose(0, 1).reshape(self.channels, -1).float() for e in groups], 1)
        self.feature_mean.copy_(flat.mean(1))
        self.feature_std.copy_(flat.std(1).clamp_min(1e-6))

    def base_logits(self, z: torch.Tensor) -> torch.Tensor:
        # log(1 + z): far outliers do not saturate the sigmoid, so the untrained head keeps PatchCore's ranking
        return self.log_scale.exp() * (torch.log1p(z.clamp_min(0)) - self.offset)

    def forward(self, embedding: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = (embedding - self.feature_mean.view(1, -1, 1, 1)) / self.feature_std.view(1, -1, 1, 1)
        x = F.relu(self.reduce(x))
        x = self.body(torch.cat([x, torch.log1p(z.clamp_min(0)).unsqueeze(1)], 1))
        return self.base_logits(z) + self.out(x)[:, 0]

    def image_logits(self, cell_logits: torch.Tensor) -> torch.Tensor:
        """(B,) the mean of each image's `top_k` highest cell logits."""
        flat = cell_logits.flatten(1)
        return flat.topk(min(self.top_k, flat.shape[1]), dim=1).values.mean(1)
