"""Mutual scoring (MuSc, Li et al., ICLR 2024) on patch embeddings: no references, no labels.

Most images of a set are normal, so a normal patch has a close match in most other images and an anomalous one
in few. Per patch of image i and per other image j: the distance to its nearest patch of j
(`model.patchcore.torch_model.nearest_neighbor`, PatchCore's chunked search, one other image at a time). Over the
other images those distances are aggregated by MuSc's interval average: the mean of the smallest `fraction` of
them, so the few other images that share a defect (or are broken elsewhere) do not pull a normal patch up and a
defect shared by fewer than `fraction` of the images still stands out.

Memory stays bounded: queries are taken `query_images` images at a time, so a block holds
(query_images · P, other images) distances plus PatchCore's own bounded search blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from model.patchcore.torch_model import MAX_BLOCK_ELEMENTS, nearest_neighbor

# The interval [0, FRACTION] of the per-image nearest distances, smallest first. MuSc uses 30 %; on the shared
# samples, whose test sets are 38-73 % defective, the median (50 %) is better offline (docs/models.md), while the
# online window, which holds only normal-looking frames, keeps MuSc's 30 %.
FRACTION = 0.5
WINDOW_FRACTION = 0.3
TOP_FRACTION = 0.01  # image score: mean of the top 1 % of the blurred map's pixels


def smallest_mean(distances: torch.Tensor, fraction: float = FRACTION) -> torch.Tensor:
    """(Q, M) distances (inf = no such image) → (Q,) mean of the smallest `fraction` of the finite ones."""
    finite = torch.isfinite(distances).sum(dim=1).clamp_min(1)
    count = math.ceil(fraction * int(finite.min()))
    count = max(1, min(count, distances.shape[1]))
    return distances.topk(count, dim=1, largest=False).values.mean(dim=1)


def nearest_per_image(queries: torch.Tensor, others: Sequence[torch.Tensor],
                      max_elements: int = MAX_BLOCK_ELEMENTS) -> torch.Tensor:
    """(Q, D) query patches, M other images' patches (P_j, D) → (Q, M): distance to the nearest patch of each."""
    columns = [nearest_neighbor(queries, other, None, max_elements)[0] for other in others]
    if not columns:
        return queries.new_empty(queries.shape[0], 0)
    return torch.stack(columns, dim=1)


def other_indices(n_images: int, max_others: int | None) -> list[int]:
    """The images every query is compared with: all, or `max_others` + 1 spread evenly over the set (so that
    each query still has `max_others` others once itself is left out)."""
    if not max_others or n_images <= max_others + 1:
        return list(range(n_images))
    step = n_images / (max_others + 1)
    return sorted({int(k * step) for k in range(max_others + 1)})


@torch.no_grad()
def mutual_patch_scores(embeddings: torch.Tensor, *, fraction: float = FRACTION, max_others: int | None = None,
                        query_images: int = 16, max_elements: int = MAX_BLOCK_ELEMENTS) -> torch.Tensor:
    """(N, P, D) patch embeddings of a set → (N, P) mutual patch scores, each image against the others."""
    n_images = embeddings.shape[0]
    if n_images < 2:
        raise ValueError(f"mutual scoring needs at least 2 images of a set, got {n_images}")
    chosen = other_indices(n_images, max_others)
    others = [embeddings[j] for j in chosen]
    scores = embeddings.new_empty(embeddings.shape[:2])
    for start in range(0, n_images, query_images):
        block = embeddings[start:start + query_images]
        distances = nearest_per_image(block.reshape(-1, block.shape[-1]), others, max_elements)
        distances = distances.reshape(block.shape[0], block.shape[1], len(chosen))
        for offset in range(block.shape[0]):  # an image is not its own other
            if start + offset in chosen:
                distances[offset, :, chosen.index(start + offset)] = math.inf
        scores[start:start + block.shape[0]] = smallest_mean(distances.reshape(-1, len(chosen)),
                                                             fraction).reshape(block.shape[0], -1)
    return scores


def top_mean(maps: torch.Tensor, top_fraction: float = TOP_FRACTION) -> torch.Tensor:
    """(B, H, W) maps → (B,) mean of each map's largest `top_fraction` of pixels (max when that is one pixel)."""
    flat = maps.flatten(1)
    count = max(1, round(top_fraction * flat.shape[1]))
    return flat.topk(count, dim=1).values.mean(dim=1)
