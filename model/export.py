"""Export graphs: the image-dependent part of each detector as a plain `nn.Module` that `torch.onnx.export` can
trace, plus what the graph needs from outside it.

`export_graph(detector, class_names)` gives an `ExportGraph`: `module(images, *aux) -> (scores (B,), maps (B,S,S))`
in float32 at model resolution, with a dynamic batch axis. What does not depend on the image is taken out:
- AnomalyCLIP's text features (class-agnostic) and few-shot reference banks are folded into the graph as
  constants;
- the class-aware models' per-class inputs (CLIP/CLIP-AC/WinCLIP text features, AdaCLIP's prompt token ids, whose
  text pass depends on the image through the dynamic prompts) become a second graph input, and their values per
  class name are shipped beside the graph (`ExportGraph.aux.per_class`).

Each family declares its exporter on its registration (`ModelFamily.exporter`, e.g.
`imported_later("model.export", "anomalyclip_graph")`), or a plug-in adds one with `register_exporter(name)`;
a family without one (or a configuration whose
dynamic part a static graph cannot hold, e.g. AdaCLIP's k-means HSF) raises `ExportError` saying which and why.
Pure PyTorch: writing files and running the engines is `adapters.export`'s job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model._transformer import embed_patches, standard_block
from model.baselines import anomalous_probability, harmonic_mean
from model.factory import get_family, list_models, register_family
from model.gaussian import gaussian_blur
from model.preprocess import OPENAI_MEAN, OPENAI_STD

_EPS = 1e-12


def _fp16_round(tensor: torch.Tensor) -> torch.Tensor:
    # AdaCLIP splices its prompts in with `.half()` (official code); the same rounding keeps parity.
    return tensor.half().to(tensor.dtype)


def _class_token_ids(class_name: str, context_length: int) -> torch.Tensor:
    """AdaCLIP's 48 prompt sentences for a class as CLIP token ids (48, context_length)."""
    from model.adaclip.prompts import ClassNameError, class_token_ids

    try:
        return class_token_ids(class_name, context_length)
    except ClassNameError as exc:
        raise ExportError(str(exc)) from exc


class ExportError(ValueError):
    """A detector or configuration that cannot be exported; the message says which part and why."""


@dataclass
class AuxInput:
    """A per-class second graph input: `per_class[name]` is the row fed for an image of class `name`."""

    name: str
    per_class: dict[str, torch.Tensor]
    default_class: str

    def rows(self, class_names: Sequence[str]) -> torch.Tensor:
        missing = sorted({n for n in class_names if n not in self.per_class})
        if missing:
            raise ExportError(
                f"class names {missing} are not in this export (it holds {sorted(self.per_class)}): export again "
                "with them in --class-names"
            )
        return torch.stack([self.per_class[n] for n in class_names])


@dataclass
class ExportGraph:
    """What `adapters.export` needs to write, check and describe one export."""

    module: nn.Module
    model: str
    version: str
    image_size: int
    backbone: str
    taps: list[int]
    tolerance: dict[str, float]  # absolute tolerances of the parity gate: {"scores": .., "maps": ..}
    aux: AuxInput | None = None
    details: dict[str, Any] = field(default_factory=dict)
    # What scores and maps mean, for thresholds: probabilities in [0, 1], or unbounded distances (PatchCore).
    threshold_scale: dict[str, Any] = field(default_factory=lambda: {"scores": [0.0, 1.0], "maps": [0.0, 1.0]})

    @property
    def input_names(self) -> list[str]:
        return ["images"] + ([self.aux.name] if self.aux is not None else [])

    output_names = ("scores", "maps")

    def example_inputs(self, images: torch.Tensor, class_names: Sequence[str] | None = None) -> tuple:
        if self.aux is None:
            return (images,)
        names = list(class_names or [self.aux.default_class] * images.shape[0])
        return (images, self.aux.rows(names))

    @property
    def normalisation(self) -> dict[str, Any]:
        return {"layout": "NCHW RGB float32", "scale": 1 / 255, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}


Exporter = Callable[[Any, Sequence[str]], ExportGraph]

# Parity tolerances (absolute, float32 ONNX Runtime / OpenVINO vs eager PyTorch on CPU). The graphs are the same
# float32 arithmetic in another order; scores are softmaxes at temperature 0.07 (x14 on cosine differences), so a
# few 1e-5 of drift is expected there.
DEFAULT_TOLERANCE = {"scores": 1e-4, "maps": 1e-4}


def register_exporter(name: str) -> Callable[[Exporter], Exporter]:
    """Decorator setting the export graph of the registered family `name` (`ModelFamily.exporter`)."""

    def decorator(exporter: Exporter) -> Exporter:
        register_family(replace(get_family(name), exporter=exporter))
        return exporter

    return decorator


def exportable_models() -> list[str]:
    """The model names that have an export graph (this loads every family)."""
    return [name for name in list_models() if get_family(name).exporter is not None]


def export_graph(detector: Any, class_names: Sequence[str] | None = None) -> ExportGraph:
    """The export graph of a built detector (moved to the CPU, float32). `class_names`: the classes the shipped
    per-class inputs cover (default the detector's class name, else "object")."""
    from model.fewshot import FewShotDetector

    if isinstance(detector, FewShotDetector):
        return _fewshot_graph(detector, class_names)
    dtype = getattr(detector, "dtype", torch.float32)
    if dtype != torch.float32:
        raise ExportError(f"export runs in float32; the detector was built with {dtype} (use --dtype float32)")
    try:
        exporter = get_family(str(detector.name)).exporter
    except ValueError:  # a detector of no registered family
        exporter = None
    if exporter is None:
        raise ExportError(
            f"model {detector.name!r} has no export graph (exportable: {', '.join(exportable_models())})"
        )
    names = list(class_names or [getattr(detector, "class_name", None) or "object"])
    graph = exporter(detector, names)
    graph.module.eval()
    return graph


def _on_cpu(detector: Any) -> Any:
    model = detector.model.to("cpu").float().eval()
    detector.device = torch.device("cpu")
    return model


# ------------------------------------------------------------------------------------------------ AnomalyCLIP
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
    model = _on_cpu(detector)
    return ExportGraph(
        module=AnomalyCLIPGraph(model), model="anomalyclip", version=str(detector.version),
        image_size=int(model.image_size), backbone=model.backbone.name, taps=list(model.layers),
        tolerance=dict(DEFAULT_TOLERANCE), details={"dpam_start": model.dpam_start, "sigma": model.sigma},
    )


# ------------------------------------------------------------------------------------------------ baselines
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
    model = _on_cpu(detector)
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


# ------------------------------------------------------------------------------------------------ AdaCLIP
class AdaCLIPGraph(nn.Module):
    """AdaCLIP without HSF. Its text pass depends on the image (dynamic prompts), so it is in the graph; the
    class's 48 prompt token ids (B, 48, T) are the second input, T fixed at export (causal attention: tokens after
    the end-of-text never change a feature, so any T past the longest prompt gives the same result)."""

    def __init__(self, model: Any, n_normal: int) -> None:
        super().__init__()
        self.model = model
        self.n_normal = n_normal

    def encode_text(self, ids: torch.Tensor, dynamic: torch.Tensor) -> torch.Tensor:
        model, clip = self.model, self.model.clip
        batch, n_prompts, length = ids.shape
        flat = ids.reshape(-1, length)
        eot = flat.argmax(dim=-1)
        x = clip.token_embedding(flat) + clip.positional_embedding[:length]
        mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
        plen = model.prompt_length
        for index, block in enumerate(clip.transformer.resblocks):
            if 1 <= index < model.prompt_depth:
                context = _fp16_round(model.text_prompter.static_prompts[index] + dynamic)
                context = context.unsqueeze(1).expand(-1, n_prompts, -1, -1).reshape(-1, plen, context.shape[-1])
                x = torch.cat([x[:, :1], context, x[:, 1 + plen:]], dim=1)
            x = standard_block(block, x, mask)
        x = clip.ln_final(x)
        rows = torch.arange(x.shape[0], device=x.device)
        features = F.normalize((x[rows, eot] @ clip.text_projection).float(), dim=-1)
        features = features.reshape(batch, n_prompts, -1)
        normal = F.normalize(features[:, : self.n_normal].mean(dim=1), dim=-1)
        anomalous = F.normalize(features[:, self.n_normal:].mean(dim=1), dim=-1)
        return torch.stack([normal, anomalous], dim=2)

    def forward(self, images: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from model.adaclip import LOGIT_SCALE, AdaCLIPOutput

        model = self.model
        u = model.plain_image_features(images)
        pooled, tap_tokens = model.encode_image(images, model.dynamic_visual_prompt_generator.stacked(u))
        text = self.encode_text(token_ids, model.dynamic_text_prompt_generator.stacked(u))
        patch_features = [F.normalize(f.float(), dim=-1)
                          for f in model.patch_token_layer.each([t[:, 1:] for t in tap_tokens])]
        global_features = F.normalize(model.cls_token_layer.head[0](pooled).float(), dim=-1)
        tap_logits = [LOGIT_SCALE * torch.bmm(p, text) for p in patch_features]
        image_logits = LOGIT_SCALE * torch.bmm(global_features.unsqueeze(1), text).squeeze(1)
        output = AdaCLIPOutput(image_probs=image_logits.softmax(dim=-1), tap_logits=tap_logits, text_features=text,
                               global_features=global_features, patch_features=patch_features)
        return output.scores, model.anomaly_maps(output)


def adaclip_graph(detector: Any, class_names: Sequence[str]) -> ExportGraph:
    from model.adaclip import class_prompts

    model = detector.model
    if model.use_hsf:
        raise ExportError(
            "adaclip with --hsf cannot be exported: hybrid semantic fusion clusters each image's patches with "
            "k-means (data-dependent iterations and cluster counts), which a static graph cannot hold; export "
            "without --hsf"
        )
    model = _on_cpu(detector)
    context = int(model.clip.positional_embedding.shape[0])
    ids = {name: _class_token_ids(name, context) for name in class_names}
    length = max(max(int(t.argmax(dim=-1).max()) + 1 for t in ids.values()), model.prompt_length + 2)
    # Room for longer class names than the exported ones (the ids are cheap; the text pass runs on T tokens).
    length = min(context, length + 8)
    per_class = {name: t[:, :length].clone() for name, t in ids.items()}
    _, n_normal = class_prompts(class_names[0])
    return ExportGraph(
        module=AdaCLIPGraph(model, n_normal), model="adaclip", version=str(detector.version),
        image_size=int(model.image_size), backbone=model.backbone.name, taps=list(model.taps),
        tolerance={"scores": 2e-4, "maps": 2e-4}, aux=AuxInput("token_ids", per_class,
                                                              default_class=detector.class_name or class_names[0]),
        details={"prompt_length": model.prompt_length, "prompt_depth": model.prompt_depth, "token_length": length,
                 "hsf": False, "sigma": model.sigma},
    )


def adaclip_token_ids(class_name: str, length: int, context_length: int = 77) -> torch.Tensor:
    """AdaCLIP's prompt token ids for a class not in the export, cut to the export's token length (raises when a
    prompt does not fit)."""
    ids = _class_token_ids(class_name, context_length)
    if int(ids.argmax(dim=-1).max()) + 1 > length:
        raise ExportError(f"class name {class_name!r} is too long for this export's {length} prompt tokens")
    return ids[:, :length].clone()


# ------------------------------------------------------------------------------------------------ few-shot
class FewShotGraph(nn.Module):
    """A base graph plus WinCLIP+-style references: the bank is a constant of the graph."""

    def __init__(self, base: ExportGraph, detector: Any) -> None:
        super().__init__()
        self.base = base.module
        self.extractor = detector.extractor
        self.weight = detector.zero_shot_weight
        self.sigma = detector.sigma
        self.image_size = detector.image_size
        for index, features in enumerate(detector.bank.features):
            self.register_buffer(f"bank_{index}", features.detach().float().cpu().clone())
        self.n_layers = len(detector.bank.features)

    def forward(self, images: torch.Tensor, *aux: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, maps = self.base(images, *aux)
        total = None
        for index, query in enumerate(self.extractor(images)):
            best = (query.float() @ getattr(self, f"bank_{index}").t()).amax(dim=-1)
            distance = (1.0 - best) / 2.0
            total = distance if total is None else total + distance
        distances = total / self.n_layers
        grid = self.extractor.grid
        upsampled = F.interpolate(distances.reshape(-1, 1, grid, grid), size=(self.image_size, self.image_size),
                                  mode="bilinear", align_corners=False)[:, 0]
        few_shot = gaussian_blur(upsampled, self.sigma)
        w = self.weight
        return (w * scores + (1.0 - w) * few_shot.flatten(1).amax(dim=1),
                w * maps + (1.0 - w) * few_shot)


def _fewshot_graph(detector: Any, class_names: Sequence[str] | None) -> ExportGraph:
    base = export_graph(detector.base, class_names)
    detector.extractor.backbone.clip.to("cpu")
    detector.extractor._pos = detector.extractor._pos.to("cpu")
    detector.bank = detector.bank.to("cpu")
    detector.device = torch.device("cpu")
    return ExportGraph(
        module=FewShotGraph(base, detector), model=base.model, version=str(detector.version),
        image_size=base.image_size, backbone=base.backbone, taps=base.taps,
        tolerance={k: v * 2 for k, v in base.tolerance.items()}, aux=base.aux,
        details={**base.details, "references": {
            "n_references": detector.bank.n_references, "digest": detector.bank.digest,
            "layers": list(detector.extractor.layers), "kind": detector.extractor.kind,
            "zero_shot_weight": detector.zero_shot_weight}},
    )


# ------------------------------------------------------------------------------------------------ PatchCore
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
