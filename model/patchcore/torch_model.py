"""PatchCore (Roth et al., CVPR 2022) as anomalib 2.7.0's `PatchcoreModel` computes it, in plain PyTorch.

- Features: the taps of a frozen CNN (BatchNorm on running statistics), each average-pooled 3x3 (stride 1,
  padding 1, zeros counted), the coarser taps upsampled bilinearly (align_corners False) to the first tap's grid
  and concatenated → one embedding per patch.
- Memory bank: the embeddings of every patch of the normal references (or a greedy k-center coreset of them).
- Patch score: Euclidean distance to the nearest bank row, searched exactly by `nearest` (model/patchcore/search.py:
  int8 or bf16 candidates proven by a certificate and re-checked in fp32 on CPUs with int8 / bf16 products, fp32
  elsewhere), in blocks so that memory stays bounded.
- Image score: anomalib's re-weighting (num_neighbors 9): for the patch with the largest score, the softmax over
  its distances to the bank rows nearest to its own nearest neighbour gives the weight 1 - softmax[0].
- Map: patch scores upsampled to the input size (nearest), blurred by a Gaussian (sigma 4, kernel 33, reflect).
The same code runs on CPU and CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model.gaussian import gaussian_blur
from model.patchcore.backbone import Tap, TapExtractor
from model.patchcore.search import nearest

NUM_NEIGHBORS = 9
SIGMA = 4.0
# Bank rows x query patches per distance block: 2^24 float32 entries = 64 MiB at most per block.
MAX_BLOCK_ELEMENTS = 1 << 24


def squared_norms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).sum(dim=-1)


def euclidean_distances(x: torch.Tensor, y: torch.Tensor, y_norms: torch.Tensor | None = None) -> torch.Tensor:
    """(N, M) Euclidean distances as anomalib computes them: |x|² - 2 x·y + |y|², clamped at 0, square root."""
    y_norms = squared_norms(y) if y_norms is None else y_norms
    result = squared_norms(x).unsqueeze(-1) - 2.0 * (x @ y.transpose(-2, -1)) + y_norms.unsqueeze(-2)
    return result.clamp_min_(0).sqrt_()


def nearest_neighbor(queries: torch.Tensor, bank: torch.Tensor, bank_norms: torch.Tensor | None = None,
                     max_elements: int = MAX_BLOCK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance, index) of each query row's nearest bank row, the bank searched in chunks of rows (and the
    queries too, when there are many) so that no block holds more than `max_elements` distances."""
    bank_norms = squared_norms(bank) if bank_norms is None else bank_norms
    n_queries, n_bank = queries.shape[0], bank.shape[0]
    query_chunk = max(1, min(n_queries, max_elements // max(1, min(n_bank, max_elements))))
    bank_chunk = max(1, max_elements // query_chunk)
    best = torch.empty(n_queries, device=queries.device, dtype=queries.dtype)
    where = torch.empty(n_queries, device=queries.device, dtype=torch.long)
    for q_start in range(0, n_queries, query_chunk):
        query = queries[q_start:q_start + query_chunk]
        query_norms = squared_norms(query).unsqueeze(-1)
        block_best = block_where = None
        for b_start in range(0, n_bank, bank_chunk):
            rows = bank[b_start:b_start + bank_chunk]
            # squared distances; the square root is taken once on the minimum (monotone), as clamp+sqrt commute
            squared = torch.addmm(bank_norms[b_start:b_start + bank_chunk].unsqueeze(0), query, rows.t(),
                                  beta=1.0, alpha=-2.0).add_(query_norms)
            value, index = squared.min(dim=1)
            if block_best is None:
                block_best, block_where = value, index
            else:
                better = value < block_best
                block_best = torch.where(better, value, block_best)
                block_where = torch.where(better, index + b_start, block_where)
        best[q_start:q_start + query_chunk] = block_best.clamp_min_(0).sqrt_()
        where[q_start:q_start + query_chunk] = block_where
    return best, where


def k_nearest(queries: torch.Tensor, bank: torch.Tensor, k: int, bank_norms: torch.Tensor | None = None,
              max_elements: int = MAX_BLOCK_ELEMENTS) -> torch.Tensor:
    """Indices (N, k) of each query row's k nearest bank rows, nearest first (chunked over the bank)."""
    bank_norms = squared_norms(bank) if bank_norms is None else bank_norms
    k = min(k, bank.shape[0])
    bank_chunk = max(k, max_elements // max(1, queries.shape[0]))
    best_values = best_index = None
    for start in range(0, bank.shape[0], bank_chunk):
        rows = bank[start:start + bank_chunk]
        squared = squared_norms(queries).unsqueeze(-1) - 2.0 * (queries @ rows.t()) + bank_norms[start:start + bank_chunk]
        values, index = squared.topk(min(k, rows.shape[0]), dim=1, largest=False)
        index = index + start
        if best_values is not None:
            values, index = torch.cat([best_values, values], 1), torch.cat([best_index, index], 1)
        order = values.topk(min(k, values.shape[1]), dim=1, largest=False).indices
        best_values, best_index = values.gather(1, order), index.gather(1, order)
    return best_index


class PatchcoreModel(nn.Module):
    """Embeddings, memory bank, scores and maps. `memory_bank` is a buffer (M, D), empty until references."""

    def __init__(self, extractor: TapExtractor, *, num_neighbors: int = NUM_NEIGHBORS, sigma: float = SIGMA,
                 max_block_elements: int = MAX_BLOCK_ELEMENTS) -> None:
        super().__init__()
        self.extractor = extractor
        self.num_neighbors = int(num_neighbors)
        self.sigma = float(sigma)
        self.max_block_elements = int(max_block_elements)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1)
        self.register_buffer("memory_bank", torch.empty(0, 0), persistent=False)
        self.register_buffer("bank_norms", torch.empty(0), persistent=False)

    @property
    def taps(self) -> tuple[Tap, ...]:
        return self.extractor.taps

    def train(self, mode: bool = True) -> PatchcoreModel:
        return super().train(False)  # always inference: the backbone's BatchNorm keeps its running statistics

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The raw tap outputs, in tap order."""
        return self.extractor(images)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) patch embeddings at the first tap's grid."""
        pooled = [self.pool(f.float()) for f in self.features(images)]
        embedding = pooled[0]
        for feature in pooled[1:]:
            upsampled = F.interpolate(feature, size=embedding.shape[-2:], mode="bilinear", align_corners=False)
            embedding = torch.cat((embedding, upsampled), 1)
        return embedding

    @staticmethod
    def flatten(embedding: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) → (B·h·w, D), patches in row-major order per image."""
        return embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])

    def set_memory_bank(self, bank: torch.Tensor) -> None:
        device = next(self.extractor.parameters()).device
        bank = bank.to(device=device, dtype=torch.float32).contiguous()
        self.memory_bank = bank
        self.bank_norms = squared_norms(bank)

    @property
    def has_bank(self) -> bool:
        return self.memory_bank.numel() > 0

    @torch.no_grad()
    def patch_scores(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scores (B, h·w), nearest bank row (B, h·w), flat embedding (B, h·w, D))."""
        if not self.has_bank:
            raise RuntimeError("PatchCore has no memory bank: build it from normal references first")
        batch, dim, height, width = embedding.shape
        if dim != self.memory_bank.shape[1]:
            raise ValueError(f"embedding has {dim} channels, the memory bank {self.memory_bank.shape[1]}")
        flat = self.flatten(embedding)
        scores, where = nearest(flat, self.memory_bank, self.bank_norms, self.max_block_elements)
        return scores.reshape(batch, -1), where.reshape(batch, -1), flat.reshape(batch, height * width, dim)

    @torch.no_grad()
    def image_scores(self, scores: torch.Tensor, where: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """anomalib's `compute_anomaly_score` (re-weighted maximum patch score)."""
        if self.num_neighbors == 1:
            return scores.amax(1)
        rows = torch.arange(scores.shape[0], device=scores.device)
        top = scores.argmax(dim=1)
        score = scores[rows, top]
        top_features = flat[rows, top]  # (B, D)
        nearest = self.memory_bank[where[rows, top]]  # (B, D)
        support = k_nearest(nearest, self.memory_bank, self.num_neighbors, self.bank_norms,
                            self.max_block_elements)  # (B, k)
        distances = euclidean_distances(top_features.unsqueeze(1), self.memory_bank[support]).squeeze(1)
        weights = 1.0 - torch.softmax(distances, dim=1)[:, 0]
        return weights * score

    @torch.no_grad()
    def anomaly_maps(self, scores: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        """(B, H, W): nearest upsampling of the patch scores, Gaussian blur (anomalib's GaussianBlur2d)."""
        maps = F.interpolate(scores.reshape(-1, 1, *grid), size=size, mode="nearest")
        return gaussian_blur(maps, self.sigma, padding="reflect")[:, 0]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image scores (B,), anomaly maps (B, H, W)) for TF-normalised images (B, 3, H, W)."""
        embedding = self.embed(images)
        scores, where, flat = self.patch_scores(embedding)
        image_scores = self.image_scores(scores, where, flat)
        return image_scores, self.anomaly_maps(scores, tuple(embedding.shape[-2:]), tuple(images.shape[-2:]))

    @torch.no_grad()
    def reference_embeddings(self, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """(K·h·w, D) memory-bank rows from TF-normalised reference images."""
        rows = [self.flatten(self.embed(images[start:start + batch_size]))
                for start in range(0, images.shape[0], batch_size)]
        return torch.cat(rows)


def tap_channels(model: PatchcoreModel, image_size: int) -> Sequence[int]:
    """Channels of each tap (a probe forward pass on a small zero image)."""
    device = next(model.extractor.parameters()).device
    return [f.shape[1] for f in model.features(torch.zeros(1, 3, image_size, image_size, device=device))]
