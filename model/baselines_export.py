"""The export graphs of the CLIP baselines (clip, clip-ac, winclip; model/baselines.py registers them as their
families' `exporter`, model/export.py): one vision pass scored against per-class text features, which are the
graph's second input and shipped per class beside it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from model._transformer import embed_patches
from model.baselines import anomalous_probability, harmonic_mean
from model.export import DEFAULT_TOLERANCE, AuxInput, ExportGraph, on_cpu
from model.gaussian import gaussian_blur

_EPS = 1e-12


class ClipGraph(nn.Module):
    """CLIP / CLIP-AC: one vision pass scored against per-image text features `text` (B, 2, E)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.scale = model.logit_scale

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        tokens = model.run_blocks(embed_patches(model.clip.visual, images, model.vision_pos))
        projected = model.project(tokens)
        scores = anomalous_probability(projected[:, 0], text, self.scale)
        patch_probs = anomalous_probability(projected[:, 1:], text, self.scale)
        return scores, gaussian_blur(model.upsample(patch_probs), model.sigma)


class WinCLIPGraph(nn.Module):
    """WinCLIP with the harmonic aggregation as a matrix product with each scale's window/patch cover matrix
    (index_add and bincount have no static-graph form), all windows of the batch in one transformer pass."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        patches = model.grid * model.grid
        for scale in model.scales:
            windows = model.windows(scale)
            cover = torch.zeros(windows.shape[0], patches)
            cover.scatter_(1, windows, 1.0)
            self.register_buffer(f"cover_{scale}", cover)
            index = torch.cat([torch.zeros(windows.shape[0], 1, dtype=torch.long), windows + 1], dim=1)
            self.register_buffer(f"index_{scale}", index)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        scale = 1.0 / model.temperature
        embedded = embed_patches(model.clip.visual, images, model.vision_pos)
        full = model.project(model.run_blocks(embedded)[:, 0])
        image_scores = anomalous_probability(full, text, scale)
        patches = model.grid * model.grid
        per_scale = [image_scores[:, None].expand(-1, patches)]
        for k in model.scales:
            index, cover = getattr(self, f"index_{k}"), getattr(self, f"cover_{k}")
            batch, width = embedded.shape[0], embedded.shape[2]
            sequences = embedded[:, index].reshape(-1, index.shape[1], width)
            windows = model.project(model.run_blocks(sequences)[:, 0]).reshape(batch, index.shape[0], -1)
            window_scores = anomalous_probability(windows, text, scale)
            sums = (1.0 / window_scores.clamp_min(_EPS)) @ cover
            counts = cover.sum(dim=0)
            per_scale.append(torch.where(counts > 0, counts / sums.clamp_min(_EPS), torch.zeros_like(sums)))
        maps = gaussian_blur(model.upsample(harmonic_mean(per_scale)), model.sigma)
        return image_scores, maps


def _baseline_graph(detector: Any, class_names: Sequence[str], module_type: type[nn.Module]) -> ExportGraph:
    model = on_cpu(detector)
    with torch.no_grad():
        per_class = {name: model.class_text_features(name).detach().clone() for name in class_names}
    details: dict[str, Any] = {"sigma": model.sigma, "prompt_ensemble": model.ensemble}
    if hasattr(model, "scales"):
        details.update(scales=list(model.scales), temperature=model.temperature)
    return ExportGraph(
        module=module_type(model), model=str(detector.name), version=str(detector.version),
        image_size=int(model.image_size), backbone=model.backbone.name, taps=[model.backbone.vision_layers],
        tolerance=dict(DEFAULT_TOLERANCE), details=details,
        aux=AuxInput("text_features", per_class, default_class=detector.class_name),
    )


def clip_graph(detector: Any, class_names: Sequence[str]) -> ExportGraph:
    return _baseline_graph(detector, class_names, ClipGraph)


def winclip_graph(detector: Any, class_names: Sequence[str]) -> ExportGraph:
    return _baseline_graph(detector, class_names, WinCLIPGraph)
