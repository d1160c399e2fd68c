"""patchcore-head's export graph (its family's `exporter`, model/export.py): PatchCore's embedding and chunked
nearest-neighbour search (model/patchcore/export.py, the bank a constant of the graph), then the head's cell
logits, image score and map, as `PatchcoreHeadDetector.predict` computes them on squashed square inputs.

The exported graph is a fixed square (as PatchCore's): a detector on the fit geometry is refused (the daemon
refuses `resize = "fit"` with a non-torch engine as a configuration error before it gets here)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.export import ExportError, ExportGraph
from model.gaussian import gaussian_blur
from model.patchcore.export import PatchCoreGraph
from model.supervised.detector import NAME, SIGMA

# Scores and maps are sigmoids (0–1); the search's float32 reordering moves distances by ~1e-6 relative, which the
# head's logit scale and the sigmoid (slope <= 1/4) keep near 1e-6 absolute: 1e-4 leaves ample room and still
# catches a wrong head, bank or blur.
HEAD_TOLERANCE = {"scores": 1e-4, "maps": 1e-4}


class PatchcoreHeadGraph(nn.Module):
    """images (B, 3, S, S) → (sigmoid of the head's top-k image logit (B,), blurred sigmoid map (B, S, S))."""

    def __init__(self, detector: Any, checkpoint: Any) -> None:
        super().__init__()
        self.search = PatchCoreGraph(detector.patchcore)
        self.head = checkpoint.head
        self.distance_scale = float(checkpoint.distance_scale)
        self.sigma = SIGMA

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from model.patchcore import clip_to_tf

        embedding = self.search.model.embed(clip_to_tf(images.float())).float()
        batch, _, height, width = embedding.shape
        distances, _ = self.search.nearest(self.search.model.flatten(embedding))
        logits = self.head(embedding, distances.reshape(batch, height, width) / self.distance_scale)
        scores = torch.sigmoid(self.head.image_logits(logits))
        maps = F.interpolate(torch.sigmoid(logits).unsqueeze(1), size=tuple(images.shape[-2:]), mode="bilinear",
                             align_corners=False)
        maps = gaussian_blur(maps, self.sigma, padding="reflect")[:, 0]
        return scores, maps.clamp(0, 1)


def patchcore_head_graph(detector: Any, class_names: Sequence[str]) -> ExportGraph:
    """The ExportGraph of a `PatchcoreHeadDetector` with references (its trained head, else the untrained one)."""
    patchcore = detector.patchcore
    if patchcore.bank is None:
        raise ExportError(f"{NAME} without a memory bank cannot be exported: give it normal references first")
    if detector.geometry.resize != "squash":
        raise ExportError(f"{NAME} on resize {detector.geometry.resize!r} cannot be exported: an export is a fixed "
                          "square graph (resize \"squash\"); run this geometry on the torch engine")
    patchcore.model.to("cpu").float().eval()
    patchcore.device = torch.device("cpu")
    # The untrained head's output does not depend on its random layers (the last convolution is zero), so this one
    # and the one PyTorch makes on its first predict give the same scores.
    checkpoint = detector.checkpoint or detector.untrained_checkpoint()
    trained = not checkpoint.metadata.get("untrained")
    head, bank = checkpoint.head.to("cpu").float().eval(), patchcore.bank
    return ExportGraph(
        module=PatchcoreHeadGraph(detector, checkpoint), model=NAME, version=str(detector.version),
        image_size=int(detector.image_size), backbone=str(patchcore.backbone_name),
        taps=[str(t) for t in patchcore.model.taps],
        tolerance=dict(HEAD_TOLERANCE),
        details={"weights": str(patchcore.weights), "bank_rows": int(bank.rows.shape[0]),
                 "n_references": bank.n_references, "bank_digest": bank.digest,
                 "head_digest": checkpoint.digest() if trained else "h0", "trained": trained,
                 "distance_scale": checkpoint.distance_scale, "top_k": head.top_k, "hidden": head.hidden,
                 "kernel": head.kernel, "sigma": SIGMA},
    )
