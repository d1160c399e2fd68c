"""The one way to build a detector: `create_detector(name, ...)`, with a registry of model builders.

Every detector implements the `Detector` protocol: `predict(images) -> Prediction` on a batch of preprocessed
images (B, 3, S, S). Further models (AdaCLIP, the CLIP/WinCLIP baselines) register here with `register_model`.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from model._backbone import (
    DEFAULT_BACKBONE,
    DEFAULT_PRETRAINED,
    ClipBackbone,
    describe_state_mismatch,
    load_backbone,
)
from model.anomalyclip import AnomalyCLIP
from model.checkpoints import CheckpointError, PromptCheckpoint, load_prompts

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Prediction:
    scores: torch.Tensor  # (B,) float32 image anomaly scores
    maps: torch.Tensor  # (B, S, S) float32 anomaly maps in model input space


@runtime_checkable
class Detector(Protocol):
    name: str
    version: str
    image_size: int
    device: torch.device

    def predict(self, images: torch.Tensor, class_names: Sequence[str] | None = None) -> Prediction: ...


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device {device!r} is not valid: expected auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    return resolved


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def file_digest(path: str | Path, length: int = 12) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


class AnomalyCLIPDetector:
    """AnomalyCLIP behind the Detector protocol: device placement, autocast, fixed output dtype."""

    name = "anomalyclip"

    def __init__(self, model: AnomalyCLIP, *, device: torch.device, dtype: torch.dtype, version: str) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.dtype = dtype
        self.version = version
        self.image_size = model.image_size

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_names: Sequence[str] | None = None) -> Prediction:
        images = images.to(self.device, non_blocking=True)
        with self._autocast():
            scores, maps = self.model.predict(images)
        return Prediction(scores=scores.float(), maps=maps.float())


ModelBuilder = Callable[..., Detector]
MODEL_REGISTRY: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def decorator(builder: ModelBuilder) -> ModelBuilder:
        MODEL_REGISTRY[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    return sorted(MODEL_REGISTRY)


def build_anomalyclip(
    backbone: ClipBackbone,
    prompts: PromptCheckpoint | None,
    *,
    layers: Sequence[int] = (24,),
    image_size: int = 518,
) -> AnomalyCLIP:
    """An AnomalyCLIP sized for the prompts (n_ctx, depth, deep length) with the prompts loaded; random prompts
    (official init) when `prompts` is None, e.g. to start training."""
    shape = prompts.learner_shape if prompts is not None else {}
    if shape and shape["width"] != backbone.text_width:
        raise CheckpointError(
            f"{prompts.path}: prompts have width {shape['width']} but backbone {backbone.name} has text width "
            f"{backbone.text_width}: they belong to another backbone"
        )
    model = AnomalyCLIP(
        backbone, layers=layers, image_size=image_size,
        n_ctx=shape.get("n_ctx", 12), depth=shape.get("depth", 9), deep_length=shape.get("deep_length", 4),
    )
    if prompts is not None:
        mismatch = describe_state_mismatch(model.prompt_learner, prompts.state)
        if mismatch:
            raise CheckpointError(f"{prompts.path}: prompt checkpoint does not fit AnomalyCLIP: {mismatch}")
        model.load_prompt_state(prompts.state)
    return model.eval()


@register_model("anomalyclip")
def _create_anomalyclip(
    *,
    backbone: str | Path | ClipBackbone = DEFAULT_BACKBONE,
    backbone_config: str | Path | None = None,
    pretrained: str | None = DEFAULT_PRETRAINED,
    prompts: str | Path | PromptCheckpoint | None = None,
    layers: Sequence[int] = (24,),
    image_size: int = 518,
    device: torch.device,
    dtype: torch.dtype,
    **_: Any,
) -> Detector:
    if prompts is None:
        raise CheckpointError(
            "AnomalyCLIP needs learned prompts: pass --prompts FILE (train one with `anomalyd train`, or get the "
            "released ones with `anomalyd weights fetch`), or choose a training-free model with --model"
        )
    checkpoint = prompts if isinstance(prompts, PromptCheckpoint) else load_prompts(prompts)
    if not isinstance(backbone, ClipBackbone):
        backbone = load_backbone(backbone, config=backbone_config, pretrained=pretrained)
    model = build_anomalyclip(backbone, checkpoint, layers=layers, image_size=image_size)
    digest = file_digest(checkpoint.path) if checkpoint.path is not None else "memory"
    version = checkpoint.metadata.get("version") or f"anomalyclip-{digest}"
    return AnomalyCLIPDetector(model, device=device, dtype=dtype, version=str(version))


def create_detector(
    name: str = "anomalyclip",
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float32",
    **options: Any,
) -> Detector:
    """Build a detector by model name. Options: backbone, backbone_config, pretrained, prompts, layers,
    image_size, class_name, hsf, references (+ references_cache: where the reference bank is kept); options a
    model does not use are ignored by it."""
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(list_models())}")
    options = {k: v for k, v in options.items() if v is not None}
    detector = MODEL_REGISTRY[name](device=resolve_device(device), dtype=resolve_dtype(dtype), **options)
    if options.get("references") is not None and not getattr(detector, "uses_references", False):
        # Few-shot normal references (WinCLIP+ style) work on top of any model.
        from model.fewshot import with_references

        detector = with_references(detector, options["references"], cache_path=options.get("references_cache"))
    return detector
