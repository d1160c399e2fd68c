"""Greedy k-center coreset (PatchCore's memory-bank subsampling), deterministic.

As anomalib's `KCenterGreedy`: rows are compared in a random projection (Johnson-Lindenstrauss, here a Gaussian
matrix from a fixed seed, so the same bank always gives the same coreset), and each step adds the row farthest
from the rows chosen so far. The start is row 0 instead of a random row. Memory: one (N,) distance vector plus
the projected rows; each step costs one pass over the rows.
"""

from __future__ import annotations

import numpy as np
import torch

PROJECTION_DIM = 128
SEED = 0


@torch.no_grad()
def greedy_coreset(rows: torch.Tensor, size: int, *, projection_dim: int = PROJECTION_DIM,
                   seed: int = SEED) -> torch.Tensor:
    """Indices (size,) of a greedy k-center coreset of `rows` (N, D), in the order they were chosen."""
    n_rows = rows.shape[0]
    if size >= n_rows:
        return torch.arange(n_rows, device=rows.device)
    if size <= 0:
        raise ValueError(f"coreset size {size} must be positive")
    features = rows.float()
    if projection_dim and features.shape[1] > projection_dim:
        generator = torch.Generator().manual_seed(seed)
        projection = torch.randn(features.shape[1], projection_dim, generator=generator) / projection_dim ** 0.5
        features = features @ projection.to(features.device)
    if features.device.type == "cpu":
        # numpy's single-threaded element-wise loop: thousands of tiny torch ops each pay a thread-pool hand-off,
        # which costs 20x more than the arithmetic on a busy CPU.
        return torch.from_numpy(_greedy_numpy(features.numpy(), size))
    chosen = torch.empty(size, dtype=torch.long, device=rows.device)
    chosen[0] = 0
    min_distances = (features - features[0]).pow(2).sum(1)
    for step in range(1, size):
        index = torch.argmax(min_distances)
        chosen[step] = index
        distances = (features - features[index]).pow(2).sum(1)
        torch.minimum(min_distances, distances, out=min_distances)
    return chosen


def _greedy_numpy(features: np.ndarray, size: int) -> np.ndarray:
    chosen = np.empty(size, dtype=np.int64)
    chosen[0] = 0
    diff = features - features[0]
    min_distances = np.einsum("ij,ij->i", diff, diff)
    for step in range(1, size):
        index = int(np.argmax(min_distances))
        chosen[step] = index
        np.subtract(features, features[index], out=diff)
        np.minimum(min_distances, np.einsum("ij,ij->i", diff, diff), out=min_distances)
    return chosen
