"""AnomalyCLIP as a registered family: its builder, detector and everything else it declares to the registry."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from model._backbone import (
    DEFAULT_BACKBONE,
    DEFAULT_PRETRAINED,
    ClipBackbone,
    describe_state_mismatch,
    load_backbone,
)
from model.anomalyclip.checkpoint import PromptCheckpoint, import_prompts, load_prompts, save_prompts
from model.anomalyclip.model import AnomalyCLIP
from model.anomalyclip.training import TRAINING_DEFAULTS, AnomalyCLIPTarget
from model.checkpoints import CheckpointError
from model.detector import Detector, TorchDetector, file_digest
from model.factory import CheckpointFormat, ModelFamily, TrainingSpec, imported_later, register_family

DEFAULT_LAYERS = (24,)


class AnomalyCLIPDetector(TorchDetector):
    """AnomalyCLIP behind the Detector protocol (object-agnostic prompts: class names are not used)."""

    name = "anomalyclip"


def build_anomalyclip(
    backbone: ClipBackbone,
    prompts: PromptCheckpoint | None,
    *,
    layers: Sequence[int] = DEFAULT_LAYERS,
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


def build_for_training(backbone: ClipBackbone, weights: str | Path | None, *,
                       layers: Sequence[int] = DEFAULT_LAYERS, image_size: int = 518) -> AnomalyCLIP:
    """The module to train or evaluate: a prompts file loaded, or the official random start when None."""
    return build_anomalyclip(backbone, load_prompts(weights) if weights else None, layers=layers,
                             image_size=image_size)


def create_anomalyclip(
    *,
    backbone: str | Path | ClipBackbone = DEFAULT_BACKBONE,
    backbone_config: str | Path | None = None,
    pretrained: str | None = DEFAULT_PRETRAINED,
    prompts: str | Path | PromptCheckpoint | None = None,
    layers: Sequence[int] = DEFAULT_LAYERS,
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
    return AnomalyCLIPDetector(model, device=device, dtype=dtype, version=_version(checkpoint))


def _version(checkpoint: PromptCheckpoint) -> str:
    digest = file_digest(checkpoint.path) if checkpoint.path is not None else "memory"
    return str(checkpoint.metadata.get("version") or f"anomalyclip-{digest}")


def anomalyclip_version(*, prompts: str | Path | None = None, **_: Any) -> str | None:
    """The version `create_anomalyclip` gives these prompts, from the prompts file alone (no backbone)."""
    return _version(load_prompts(prompts)) if prompts is not None else None


def _save(model: AnomalyCLIP, path: str | Path, metadata: Mapping[str, Any]) -> Path:
    return save_prompts(path, model.prompt_learner.state_dict(), metadata)


FAMILY = register_family(ModelFamily(
    name="anomalyclip",
    create=create_anomalyclip,
    summary="AnomalyCLIP (ICLR 2024): object-agnostic learned prompts, DPAM patch features",
    wrap=AnomalyCLIPDetector,
    checkpoint=CheckpointFormat(load=load_prompts, save=_save, import_weights=import_prompts),
    training=TrainingSpec(build=build_for_training, target=AnomalyCLIPTarget, model_type=AnomalyCLIP,
                          defaults=TRAINING_DEFAULTS),
    exporter=imported_later("model.anomalyclip.export", "anomalyclip_graph"),
    default_taps=lambda n_layers: (n_layers,),
    default_weights="anomalyclip-visa",
    version_of=anomalyclip_version,
))  # capabilities: model.factory.BUILTIN_FAMILIES
