"""The deterministic batched k-means of AdaCLIP's hybrid semantic fusion (in place of the official sklearn call)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kmeans_plus_plus(data: torch.Tensor, k: int, *, seed: int = 111) -> torch.Tensor:
    """k-means++ seeds (B, k, D) for data (B, N, D), from draws of a seeded CPU generator shared by every image,
    so an image's seeds do not depend on the rest of its batch."""
    batch, n_points, _ = data.shape
    draws = torch.rand(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(data.device)
    rows = torch.arange(batch, device=data.device)
    first = (draws[0] * n_points).long().clamp(max=n_points - 1).expand(batch)
    centres = [data[rows, first]]
    nearest = ((data - centres[0].unsqueeze(1)) ** 2).sum(-1)  # (B, N) squared distance to the closest seed
    for j in range(1, k):
        cdf = nearest.cumsum(dim=1)
        target = (draws[j] * cdf[:, -1]).to(cdf.dtype).unsqueeze(1)
        pick = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=n_points - 1)
        centres.append(data[rows, pick])
        nearest = torch.minimum(nearest, ((data - centres[-1].unsqueeze(1)) ** 2).sum(-1))
    return torch.stack(centres, dim=1)


def kmeans(data: torch.Tensor, k: int, *, seed: int = 111, iterations: int = 300) -> torch.Tensor:
    """Deterministic batched k-means: data (B, N, D) → labels (B, N) in [0, k).

    `kmeans_plus_plus` seeds, then Lloyd iterations until no image's labels change (an empty cluster keeps its
    centre). Runs in float64.
    """
    n_points = data.shape[1]
    k = max(1, min(k, n_points))
    x = data.double()
    centre = kmeans_plus_plus(x, k, seed=seed)
    labels = torch.cdist(x, centre).argmin(dim=-1)
    for _ in range(iterations):
        one_hot = F.one_hot(labels, k).double()
        counts = one_hot.sum(dim=1).unsqueeze(-1)
        updated = one_hot.transpose(1, 2) @ x / counts.clamp(min=1)
        centre = torch.where(counts > 0, updated, centre)
        new_labels = torch.cdist(x, centre).argmin(dim=-1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels
