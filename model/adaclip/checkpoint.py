"""AdaCLIP's checkpoints: the official flat state dict (`clip_model.*`, the released `pretrained_*.pth`) and the
anomalyd safetensors format (the same names plus JSON metadata: activation, backbone, image size, taps, classes)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.adaclip.model import LEARNED_MODULES, AdaCLIP
from model.checkpoints import CheckpointError, read_safetensors, save_torch, write_safetensors

log = logging.getLogger(__name__)

OFFICIAL_PREFIX = "clip_model."
FORMAT_NAME = "anomalyd-adaclip"
FORMAT_VERSION = 1

@dataclass
class AdaCLIPCheckpoint:
    state: dict[str, torch.Tensor]  # official names without the `clip_model.` prefix
    metadata: dict[str, Any] = field(default_factory=dict)
    format: str = "anomalyd"  # or "official"
    path: Path | None = None
    unexpected: list[str] = field(default_factory=list)  # keys found in the file that AdaCLIP does not use

    def _count(self, prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in self.state if k.startswith(prefix)})

    @property
    def shape(self) -> dict[str, int]:
        """prompt length and depth, number of taps, vision and joint widths of the model these tensors fit."""
        try:
            visual = self.state["visual_prompter.static_prompts.0"]
            text = self.state["text_prompter.static_prompts.0"]
            return {"prompt_length": int(visual.shape[0]),
                    "prompt_depth": self._count("visual_prompter.static_prompts."),
                    "n_taps": self._count("patch_token_layer.head."),
                    "vision_width": int(visual.shape[1]), "joint_width": int(text.shape[1])}
        except (KeyError, IndexError) as exc:
            raise CheckpointError(f"{self.path or 'checkpoint'}: not an AdaCLIP checkpoint (missing {exc})") from exc


def _known(key: str) -> bool:
    return key.split(".", 1)[0] in LEARNED_MODULES


def load_adaclip_checkpoint(path: str | Path) -> AdaCLIPCheckpoint:
    """Read the official flat state dict (`clip_model.*`, a released `pretrained_*.pth`) or an anomalyd
    `.safetensors`. Keys AdaCLIP does not use are kept in `unexpected` (and logged); none known is an error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"AdaCLIP checkpoint {path} does not exist")
    metadata: dict[str, Any]
    if path.suffix == ".safetensors":
        tensors, metadata = read_safetensors(path, FORMAT_NAME)
        kind = "anomalyd"
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable checkpoint ({exc})") from exc
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: expected a flat state dict, found {type(obj).__name__}")
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        # The released AdaCLIP weights were trained on a tower built with nn.GELU.
        metadata = {"source": str(path), "gelu": "gelu"}
        kind = "official"
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in tensors.items():
        name = key.removeprefix("module.").removeprefix(OFFICIAL_PREFIX)
        if _known(name):
            state[name] = value.float()
        else:
            unexpected.append(key)
    if not state:
        raise CheckpointError(f"{path}: no AdaCLIP tensors ({OFFICIAL_PREFIX}text_prompter.* ...) found; keys "
                              f"{sorted(tensors)[:5]}")
    if unexpected:
        log.warning("%s: %d keys that AdaCLIP does not use: %s", path, len(unexpected), unexpected[:8])
    checkpoint = AdaCLIPCheckpoint(state=state, metadata=metadata, format=kind, path=path, unexpected=unexpected)
    checkpoint.shape  # noqa: B018  (validates the layout early, naming the file)
    return checkpoint


def export_official(model: AdaCLIP, path: str | Path) -> Path:
    """The official layout: `torch.save` of a flat dict `clip_model.<name>` (loadable by the official code)."""
    return save_torch(path, {OFFICIAL_PREFIX + k: v.detach().float().cpu().contiguous()
                             for k, v in model.learned_state_dict().items()})


def model_metadata(model: AdaCLIP, class_names: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "model": "adaclip",
        "gelu": "quick_gelu" if model.quick_gelu else "gelu",
        "backbone": model.backbone.name,
        "image_size": model.image_size,
        "taps": list(model.taps),
        "prompt_length": model.prompt_length,
        "prompt_depth": model.prompt_depth,
        "class_names": sorted(set(class_names)),
    }


def save_adaclip(model: AdaCLIP, path: str | Path, *, class_names: Sequence[str] = (),
                 metadata: Mapping[str, Any] | None = None) -> Path:
    """anomalyd format for a `.safetensors` path (tensors under the official `clip_model.*` names plus JSON
    metadata: activation, backbone, image size, taps, training class names); any other suffix writes the
    official `.pth` layout."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return export_official(model, path)
    meta = model_metadata(model, class_names)
    meta.update(metadata or {})
    tensors = {OFFICIAL_PREFIX + k: v.float() for k, v in model.learned_state_dict().items()}
    return write_safetensors(path, tensors, FORMAT_NAME, FORMAT_VERSION, meta)
