"""Loading the frozen CLIP backbone: open_clip names with pretrained tags, or local OpenAI-layout state dicts.

The detectors never call open_clip's own forward; they read the CLIP modules' parameters and run their own passes
(DPAM, deep prompts), so any open_clip `CLIP` with a ViT visual tower and the classic text tower works.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "ViT-L-14-336"
DEFAULT_PRETRAINED = "openai"
# Keys of OpenAI's state dicts that are metadata, not parameters of open_clip's CLIP.
_OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")


class BackboneError(ValueError):
    """A backbone that cannot be built or loaded; the message names the value and what was expected."""


@dataclass
class ClipBackbone:
    """A frozen open_clip CLIP model plus what the detectors need to know about it."""

    clip: nn.Module
    name: str
    quick_gelu: bool

    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    @property
    def vision_width(self) -> int:
        return self.clip.visual.conv1.out_channels

    @property
    def vision_layers(self) -> int:
        return len(self.clip.visual.transformer.resblocks)

    @property
    def patch_size(self) -> int:
        return self.clip.visual.conv1.kernel_size[0]

    @property
    def text_width(self) -> int:
        return self.clip.ln_final.weight.shape[0]

    @property
    def embed_dim(self) -> int:
        return self.clip.visual.proj.shape[1]

    @property
    def base_grid(self) -> int:
        return round((self.clip.visual.positional_embedding.shape[0] - 1) ** 0.5)


def resize_position_embedding(pos: torch.Tensor, grid: int, mode: str = "bilinear") -> torch.Tensor:
    """Resize a ViT position table (1 + g*g, C) to (1 + grid*grid, C); the CLS row is kept as is.

    AnomalyCLIP uses bilinear (align_corners False) — not open_clip's bicubic; AdaCLIP uses bicubic.
    """
    side = round((pos.shape[0] - 1) ** 0.5)
    if side == grid:
        return pos
    cls_row, table = pos[:1], pos[1:]
    table = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=(grid, grid), mode=mode, align_corners=False)
    table = table.reshape(1, pos.shape[1], grid * grid).transpose(1, 2)[0]
    return torch.cat([cls_row, table], dim=0)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights safely: safetensors, a plain `torch.save` dict (weights_only), or OpenAI's TorchScript archive."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"backbone file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as exc:
            raise BackboneError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # OpenAI's released .pt files are TorchScript archives: loading one runs no pickled Python code.
        if zipfile.is_zipfile(path):
            try:
                return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
            except Exception:
                pass
        raise BackboneError(f"{path}: not a readable checkpoint ({exc})") from exc
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise BackboneError(f"{path}: expected a state dict, found {type(obj).__name__}")
    state = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return state


def describe_state_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """Missing/unexpected keys and shape differences between a module and a state dict ("" when they fit)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}"
              for k in sorted(set(expected) & set(state)) if tuple(state[k].shape) != expected[k]]
    if shapes:
        problems.append(f"shape mismatches {shapes[:8]}{' ...' if len(shapes) > 8 else ''}")
    return "; ".join(problems)


def _clip_from_config(config: Mapping, quick_gelu: bool | None) -> nn.Module:
    from open_clip.model import CLIP

    cfg = dict(config)
    if quick_gelu is not None:
        cfg["quick_gelu"] = quick_gelu
    try:
        return CLIP(**cfg)
    except TypeError as exc:
        raise BackboneError(f"invalid open_clip model config: {exc}") from exc


def _load_config(config: str | Path | Mapping | None) -> dict | None:
    if config is None or isinstance(config, Mapping):
        return dict(config) if config is not None else None
    path = Path(config)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise BackboneError(f"backbone config {path} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise BackboneError(f"backbone config {path} is not valid JSON: {exc}") from exc


def load_backbone(
    backbone: str | Path = DEFAULT_BACKBONE,
    *,
    config: str | Path | Mapping | None = None,
    pretrained: str | None = DEFAULT_PRETRAINED,
    quick_gelu: bool | None = None,
    cache_dir: str | None = None,
) -> ClipBackbone:
    """Build a frozen float32 CLIP.

    `backbone` is an open_clip model name (weights from `pretrained`, e.g. "openai", through open_clip's download
    cache) or a file with an OpenAI-layout state dict (`config`: an open_clip model config JSON for non-standard
    sizes; without it the sizes are inferred from the weights). `quick_gelu` overrides the activation (OpenAI
    weights use QuickGELU; AdaCLIP's released weights were trained with nn.GELU).
    """
    cfg = _load_config(config)
    path = Path(backbone)
    if path.suffix in (".pt", ".pth", ".bin", ".safetensors") or path.is_file():
        state = read_state_dict(path)
        for key in _OPENAI_METADATA_KEYS:
            state.pop(key, None)
        state = {k: v.float() for k, v in state.items()}
        if cfg is not None:
            clip = _clip_from_config(cfg, quick_gelu)
            mismatch = describe_state_mismatch(clip, state)
            if mismatch:
                raise BackboneError(f"{path} does not fit the config: {mismatch}")
            clip.load_state_dict(state, strict=True)
            gelu = bool(cfg.get("quick_gelu", False) if quick_gelu is None else quick_gelu)
        else:
            from open_clip.model import build_model_from_openai_state_dict

            gelu = True if quick_gelu is None else quick_gelu
            full = dict(state)
            full.setdefault("input_resolution", torch.tensor(0))
            try:
                clip = build_model_from_openai_state_dict(full, quick_gelu=gelu, cast_dtype=torch.float32)
            except (KeyError, RuntimeError, IndexError) as exc:
                raise BackboneError(
                    f"{path} is not an OpenAI-layout CLIP state dict ({exc}); pass --backbone-config for other layouts"
                ) from exc
        name = str(path)
    else:
        import open_clip

        if backbone not in open_clip.list_models() and cfg is None:
            raise BackboneError(
                f"unknown backbone {backbone!r}: not a file and not an open_clip model name "
                f"(e.g. {DEFAULT_BACKBONE!r}; see open_clip.list_models())"
            )
        if cfg is not None:
            clip = _clip_from_config(cfg, quick_gelu)
            gelu = bool(cfg.get("quick_gelu", False) if quick_gelu is None else quick_gelu)
        else:
            # open_clip's configs (e.g. ViT-L-14-336) build nn.GELU; OpenAI's weights were trained with QuickGELU,
            # so it is forced for them unless the caller asks otherwise (AdaCLIP's released weights: nn.GELU).
            gelu = bool(quick_gelu) if quick_gelu is not None else pretrained == "openai"
            try:
                clip = open_clip.create_model(
                    backbone, pretrained=pretrained, cache_dir=cache_dir, force_quick_gelu=gelu, precision="fp32",
                )
            except Exception as exc:
                raise BackboneError(
                    f"could not load open_clip backbone {backbone!r} with pretrained={pretrained!r}: {exc}. "
                    "Run `anomalyd weights fetch` while online, or pass --backbone with a local state-dict file."
                ) from exc
        name = backbone if not pretrained else f"{backbone}/{pretrained}"
    if not hasattr(clip, "visual") or not hasattr(clip.visual, "conv1") or not hasattr(clip, "token_embedding"):
        raise BackboneError(f"{backbone}: only CLIP models with a ViT image tower and the classic text tower work")
    clip = clip.float().eval()
    clip.requires_grad_(False)
    return ClipBackbone(clip=clip, name=name, quick_gelu=gelu)
