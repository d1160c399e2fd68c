"""AdaCLIP as a registered family: its builder, detector and everything else it declares to the registry."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from model._backbone import DEFAULT_BACKBONE, DEFAULT_PRETRAINED, ClipBackbone, load_backbone
from model.adaclip.checkpoint import AdaCLIPCheckpoint, load_adaclip_checkpoint, save_adaclip
from model.adaclip.model import AdaCLIP, default_taps, uses_quick_gelu
from model.adaclip.prompts import ClassNameError
from model.adaclip.training import TRAINING_DEFAULTS, AdaCLIPTarget
from model.checkpoints import CheckpointError
from model.detector import TorchDetector, file_digest
from model.factory import CheckpointFormat, ModelFamily, TrainingSpec, imported_later, register_family

log = logging.getLogger(__name__)


def build_adaclip(
    backbone: ClipBackbone,
    checkpoint: AdaCLIPCheckpoint | None = None,
    *,
    taps: Sequence[int] | None = None,
    image_size: int | None = None,
    use_hsf: bool = False,
    k_clusters: int = 20,
) -> AdaCLIP:
    """An AdaCLIP sized for the checkpoint with its tensors loaded; official random init when it is None
    (e.g. to start training). Taps: `taps`, else the checkpoint's metadata, else `default_taps`."""
    if checkpoint is None:
        model = AdaCLIP(backbone, taps=taps, image_size=image_size or 518, use_hsf=use_hsf, k_clusters=k_clusters)
        return model.eval()
    where = checkpoint.path or "checkpoint"
    shape = checkpoint.shape
    if shape["vision_width"] != backbone.vision_width or shape["joint_width"] != backbone.embed_dim:
        raise CheckpointError(
            f"{where}: AdaCLIP tensors are for vision width {shape['vision_width']} / joint width "
            f"{shape['joint_width']}, but backbone {backbone.name} has {backbone.vision_width} / "
            f"{backbone.embed_dim}: they belong to another backbone"
        )
    wanted_gelu = checkpoint.metadata.get("gelu")
    actual_gelu = "quick_gelu" if uses_quick_gelu(backbone.clip) else "gelu"
    if wanted_gelu in ("gelu", "quick_gelu") and wanted_gelu != actual_gelu:
        raise CheckpointError(f"{where}: trained on a tower with {wanted_gelu} but backbone {backbone.name} was "
                              f"built with {actual_gelu}; load the backbone with quick_gelu={wanted_gelu == 'quick_gelu'}")
    if taps is None and checkpoint.metadata.get("taps"):
        taps = checkpoint.metadata["taps"]
    if taps is None:
        taps = default_taps(backbone.vision_layers)
    if len(taps) != shape["n_taps"]:
        raise CheckpointError(f"{where}: has {shape['n_taps']} patch heads but {len(taps)} taps {list(taps)} were "
                              "asked for")
    model = AdaCLIP(backbone, taps=taps, image_size=image_size or int(checkpoint.metadata.get("image_size", 518)),
                    prompt_length=shape["prompt_length"], prompt_depth=shape["prompt_depth"], use_hsf=use_hsf,
                    k_clusters=k_clusters)
    model.load_learned_state(checkpoint.state, source=str(where))
    return model.eval()


def build_for_training(backbone: ClipBackbone, weights: str | Path | None, *, image_size: int = 518,
                       **_: Any) -> AdaCLIP:
    """The module to train or evaluate: a checkpoint loaded, or the official random start when None (its taps
    come from the checkpoint or `default_taps`, not from the common `layers` option)."""
    return build_adaclip(backbone, load_adaclip_checkpoint(weights) if weights else None, image_size=image_size)


class AdaCLIPDetector(TorchDetector):
    """AdaCLIP behind the Detector protocol: device placement, autocast, class names per image."""

    name = "adaclip"

    def __init__(self, model: AdaCLIP, *, device: torch.device, dtype: torch.dtype, version: str,
                 class_name: str | None = None) -> None:
        super().__init__(model, device=device, dtype=dtype, version=version)
        self.class_name = class_name

    def _class_names(self, batch: int, class_names: Sequence[str] | str | None) -> list[str]:
        if isinstance(class_names, str):
            class_names = [class_names] * batch
        if class_names is None:
            if self.class_name is None:
                raise ClassNameError(
                    "AdaCLIP needs the object class of each image for its text prompts: pass class_names=[...] "
                    "(one per image) to predict, or class_name=... (the source's configured class) to create_detector"
                )
            return [self.class_name] * batch
        names = list(class_names)
        if len(names) != batch:
            raise ClassNameError(f"{len(names)} class names for a batch of {batch} images")
        bad = [n for n in names if not isinstance(n, str) or not n.strip()]
        if bad:
            raise ClassNameError(f"class names must be non-empty strings, got {bad[:3]}")
        return names

    def _before_autocast(self, images: torch.Tensor, class_names: Sequence[str] | str | None) -> list[str]:
        return self._class_names(images.shape[0], class_names)

    def _predict(self, images: torch.Tensor, class_names: Sequence[str] | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.predict(images, class_names)


def create_adaclip(
    *,
    backbone: str | Path | ClipBackbone = DEFAULT_BACKBONE,
    backbone_config: str | Path | None = None,
    pretrained: str | None = DEFAULT_PRETRAINED,
    prompts: str | Path | AdaCLIPCheckpoint | None = None,
    taps: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    image_size: int | None = None,
    class_name: str | None = None,
    hsf: bool = False,
    k_clusters: int = 20,
    device: torch.device,
    dtype: torch.dtype,
    **_: Any,
) -> AdaCLIPDetector:
    if prompts is None:
        raise CheckpointError(
            "AdaCLIP needs its learned weights: pass --prompts FILE (a released AdaCLIP pretrained_*.pth or an "
            "anomalyd .safetensors from training), or choose a training-free model with --model"
        )
    checkpoint = prompts if isinstance(prompts, AdaCLIPCheckpoint) else load_adaclip_checkpoint(prompts)
    if not isinstance(backbone, ClipBackbone):
        quick_gelu = checkpoint.metadata.get("gelu", "gelu") == "quick_gelu"
        backbone = load_backbone(backbone, config=backbone_config, pretrained=pretrained, quick_gelu=quick_gelu)
    if taps is None and layers is not None:
        # `layers` is the common CLI option; it only applies when it matches this checkpoint's patch heads.
        if len(tuple(layers)) == checkpoint.shape["n_taps"]:
            taps = layers
        else:
            log.info("adaclip: ignoring layers %s (the checkpoint has %d patch heads)", list(layers),
                     checkpoint.shape["n_taps"])
    model = build_adaclip(backbone, checkpoint, taps=taps, image_size=image_size, use_hsf=hsf,
                          k_clusters=k_clusters)
    return AdaCLIPDetector(model, device=device, dtype=dtype, version=_version(checkpoint, hsf), class_name=class_name)


def _version(checkpoint: AdaCLIPCheckpoint, hsf: bool) -> str:
    digest = file_digest(checkpoint.path) if checkpoint.path is not None else "memory"
    return str(checkpoint.metadata.get("version") or f"adaclip-{digest}{'-hsf' if hsf else ''}")


def adaclip_version(*, prompts: str | Path | None = None, hsf: bool = False, **_: Any) -> str | None:
    """The version `create_adaclip` gives these weights, from the weights file alone (no backbone)."""
    return _version(load_adaclip_checkpoint(prompts), hsf) if prompts is not None else None


def _save(model: AdaCLIP, path: str | Path, metadata: Mapping[str, Any]) -> Path:
    return save_adaclip(model, path, class_names=metadata.get("class_names", ()), metadata=metadata)


FAMILY = register_family(ModelFamily(
    name="adaclip",
    create=create_adaclip,
    summary="AdaCLIP (ECCV 2024): hybrid static + dynamic prompts in both towers, class-aware text prompts",
    wrap=AdaCLIPDetector,
    checkpoint=CheckpointFormat(load=load_adaclip_checkpoint, save=_save),
    training=TrainingSpec(build=build_for_training, target=AdaCLIPTarget, model_type=AdaCLIP,
                          defaults=TRAINING_DEFAULTS),
    exporter=imported_later("model.adaclip.export", "adaclip_graph"),
    export_class_row=imported_later("model.adaclip.export", "export_class_row"),
    default_taps=default_taps,
    # AdaCLIP's released weights were trained on a tower built with nn.GELU; new training keeps that.
    activation="gelu",
    version_of=adaclip_version,
))  # capabilities (class-aware prompts: needs_class_name): model.factory.BUILTIN_FAMILIES
