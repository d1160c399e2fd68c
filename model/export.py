"""Export graphs, family-neutral: the image-dependent part of a detector as a plain `nn.Module` that
`torch.onnx.export` can trace, plus what the graph needs from outside it.

`export_graph(detector, class_names)` gives an `ExportGraph`: `module(images, *aux) -> (scores (B,), maps (B,S,S))`
in float32 at model resolution, with a dynamic batch axis, and the parity gate's tolerances. What does not depend on
the image is taken out: constants are folded into the graph (a bank, class-agnostic text features); a class-aware
model's per-class input becomes a second graph input (`AuxInput`), its values per class name shipped beside the
graph. The few-shot wrapper (model/fewshot.py, on any family) adds its reference bank here.

Each family declares its graph on its registration (`ModelFamily.exporter`, in its own package, e.g.
`imported_later("model.anomalyclip.export", "anomalyclip_graph")`), or a plug-in adds one with
`register_exporter(name)`; a family without one (or a configuration whose dynamic part a static graph cannot hold)
raises `ExportError` saying which and why. Pure PyTorch: writing files, the parity gate and running the engines are
`adapters.export`'s job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.factory import get_family, list_models, register_family
from model.gaussian import gaussian_blur
from model.preprocess import OPENAI_MEAN, OPENAI_STD


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


def on_cpu(detector: Any) -> Any:
    """The detector's module moved to the CPU in float32 (what every graph is traced from)."""
    model = detector.model.to("cpu").float().eval()
    detector.device = torch.device("cpu")
    return model


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
