"""AnomalyCLIP's export graph (its family's `exporter`, model/export.py): the image pass with its
(image-independent, class-agnostic) text features folded in as a constant."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.export import DEFAULT_TOLERANCE, ExportGraph, on_cpu


class AnomalyCLIPGraph(nn.Module):
    """AnomalyCLIP's image pass with its (image-independent) text features as a constant."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        with torch.no_grad():
            self.register_buffer("text", model.encode_text().detach().clone())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from model.anomalyclip import TEMPERATURE

        model = self.model
        global_features, patch_features = model.encode_image(images)
        global_features = F.normalize(global_features.float(), dim=-1)
        scores = (global_features @ self.text.t() / TEMPERATURE).softmax(dim=-1)[:, 1]
        token_probs = []
        for features in patch_features:
            features = F.normalize(features[:, 1:].float(), dim=-1)
            token_probs.append((features @ self.text.t() / TEMPERATURE).softmax(dim=-1))
        return scores, model.anomaly_maps(torch.stack(token_probs, dim=1))


def anomalyclip_graph(detector: Any, class_names: Sequence[str]) -> ExportGraph:
    model = on_cpu(detector)
    return ExportGraph(
        module=AnomalyCLIPGraph(model), model="anomalyclip", version=str(detector.version),
        image_size=int(model.image_size), backbone=model.backbone.name, taps=list(model.layers),
        tolerance=dict(DEFAULT_TOLERANCE), details={"dpam_start": model.dpam_start, "sigma": model.sigma},
    )
