"""The one mapping of `[model]` and `[runtime]` to a detector's keyword options (`model.create_detector(name,
**options)`): the daemon's start, each registered version, each source's reference detector and the zero-label
windows all build through it, so a `[model]` key means the same everywhere.

Two shapes, by what the family takes: a family on CLIP weights gets every common `[model]` value (the defaults are
the CLIP models': backbone ViT-L-14-336, 518 px); a family with a backbone of its own
(`Capabilities.clip_backbone=False`) gets only the common keys the configuration sets, so its own defaults hold
otherwise. Both get the family's own options `[model]` sets (model/options.py; the configuration checked them
against `[model].name`'s declaration), those of them that the family built here (`family`, e.g. the family a
retraining trains or the zero-label family) declares.
"""

from __future__ import annotations

from typing import Any


def runtime_options(settings: Any) -> dict[str, Any]:
    """`[runtime]`'s device and dtype."""
    return {"device": settings.runtime.device, "dtype": settings.runtime.dtype}


def family_model_options(settings: Any, family: str | None = None) -> dict[str, Any]:
    """The own options `[model]` sets that `family` (default: `[model].name`) declares."""
    from model.factory import options_of
    from model.options import option_specs

    own = {spec.name for spec in option_specs(options_of(family or settings.model.name))}
    return {key: value for key, value in settings.model.family_options().items() if key in own}


def clip_model_options(settings: Any, *, backbone: Any, prompts: Any, family: str | None = None) -> dict[str, Any]:
    """Every `[model]` option of a family on CLIP weights, with its backbone (a file, or a loaded one to share) and
    its learned weights file (`prompts`: the configured file, or a registered version's)."""
    m = settings.model
    return {"backbone": backbone, "backbone_config": settings.resolve_model_value(m.backbone_config),
            "prompts": prompts, "layers": tuple(m.layers), "image_size": m.image_size, "class_name": m.class_name,
            **family_model_options(settings, family), **runtime_options(settings)}


def reference_model_options(settings: Any, family: str | None = None) -> dict[str, Any]:
    """`[model]` options of a family with its own backbone: only the common keys the configuration sets (the
    `[model]` defaults are the CLIP models'), and the family's own."""
    m = settings.model
    given = m.model_fields_set
    options: dict[str, Any] = {}
    if "backbone" in given:
        options["backbone"] = settings.resolve_model_value(m.backbone)
    if "layers" in given:
        options["layers"] = tuple(m.layers)
    if "image_size" in given:
        options["image_size"] = m.image_size
    return {**options, **family_model_options(settings, family)}
