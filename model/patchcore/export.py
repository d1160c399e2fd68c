"""PatchCore's export graph (its family's `exporter`, model/export.py): the embedding and the chunked
nearest-neighbour search with the memory bank as a constant."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from model.export import ExportError, ExportGraph


class PatchCoreGraph(nn.Module):
    """PatchCore with its memory bank as a constant. The nearest-neighbour search runs over fixed chunks of bank
    rows (the bank size is known at export, the number of query patches is not), so memory stays bounded at
    (B·h·w) x `bank_chunk` distances per step whatever the batch."""

    def __init__(self, detector: Any, bank_chunk: int = 4096) -> None:
        super().__init__()
        self.model = detector.model
        self.bank_chunk = int(bank_chunk)

    def nearest(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bank, norms = self.model.memory_bank, self.model.bank_norms
        query_norms = flat.pow(2).sum(dim=-1, keepdim=True)
        best = where = None
        for start in range(0, bank.shape[0], self.bank_chunk):
            rows = bank[start : start + self.bank_chunk]
            squared = norms[start : start + self.bank_chunk].unsqueeze(0) - 2.0 * (flat @ rows.t()) + query_norms
            value, index = squared.min(dim=1)
            if best is None:
                best, where = value, index
            else:
                better = value < best
                best, where = torch.where(better, value, best), torch.where(better, index + start, where)
        return best.clamp_min(0).sqrt(), where

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from model.patchcore import clip_to_tf

        model = self.model
        embedding = model.embed(clip_to_tf(images.float()))
        batch, dim, height, width = embedding.shape
        flat = model.flatten(embedding)
        best, where = self.nearest(flat)
        scores, where = best.reshape(batch, -1), where.reshape(batch, -1)
        image_scores = model.image_scores(scores, where, flat.reshape(batch, height * width, dim))
        return image_scores, model.anomaly_maps(scores, (height, width), tuple(images.shape[-2:]))


def patchcore_graph(detector: Any, class_names: Sequence[str]) -> ExportGraph:
    if detector.bank is None:
        raise ExportError("patchcore without a memory bank cannot be exported: give it normal references first")
    detector.model.to("cpu").eval()
    detector.device = torch.device("cpu")
    bank = detector.bank
    return ExportGraph(
        module=PatchCoreGraph(detector), model="patchcore", version=str(detector.version),
        image_size=int(detector.image_size), backbone=str(detector.backbone_name),
        taps=[str(t) for t in detector.model.taps],
        # Scores are Euclidean distances (not probabilities): the tolerance is relative to their size.
        tolerance={"scores": 1e-3, "maps": 1e-3},
        threshold_scale={"scores": "distance >= 0, unbounded", "maps": "distance >= 0, unbounded"},
        details={"weights": str(detector.weights), "bank_rows": int(bank.rows.shape[0]),
                 "n_references": bank.n_references, "bank_digest": bank.digest,
                 "num_neighbors": detector.model.num_neighbors, "sigma": detector.model.sigma},
    )
