"""The one mapping of `[model]` and `[runtime]` to a detector's keyword options (`model.create_detector(name,
**options)`): the daemon's start, each registered version, each source's reference detector and the zero-label
windows all build through it, so a `[model]` key means the same everywhere.

Two shapes, by what the family takes: a family on CLIP weights gets every `[model]` value (the defaults are the CLIP
models': backbone ViT-L-14-336, 518 px); a family on references with a backbone of its own (PatchCore) gets only the
keys the configuration sets, so its own defaults (Lite0, 256 px) hold otherwise.
"""

from __future__ import annotations

from typing import Any


def runtime_options(settings: Any) -> dict[str, Any]:
    """`[runtime]`'s device and dtype."""
    return {"device": settings.runtime.device, "dtype": settings.runtime.dtype}


def clip_model_options(settings: Any, *, backbone: Any, prompts: Any) -> dict[str, Any]:
    """Every `[model]` option of a family on CLIP weights, with its backbone (a file, or a loaded one to share) and
    its learned weights file (`prompts`: the configured file, or a registered version's)."""
    m = settings.model
    return {"backbone": backbone, "backbone_config": settings.resolve_model_value(m.backbone_config),
            "prompts": prompts, "layers": tuple(m.layers), "image_size": m.image_size, "class_name": m.class_name,
            **runtime_options(settings)}


def reference_model_options(settings: Any) -> dict[str, Any]:
    """`[model]` options of a family built on references with its own backbone: only the keys the configuration
    sets (the `[model]` defaults are the CLIP models')."""
    m = settings.model
    given = m.model_fields_set
    options: dict[str, Any] = {}
    if "backbone" in given:
        options["backbone"] = settings.resolve_model_value(m.backbone)
    if "layers" in given:
        options["layers"] = tuple(m.layers)
    if "image_size" in given:
        options["image_size"] = m.image_size
    if m.max_bank_rows is not None:
        options["max_bank_rows"] = m.max_bank_rows
    if m.augment is not None:
        options["augment"] = m.augment
    return options
