"""anomalyd's model package: anomaly detectors on frozen backbones, in pure PyTorch.

Public entry points: `create_detector` (by model name), `list_models`, `get_family` and the registration
functions of the model-family registry (`model.factory`, which says how to add a family), the `Detector`
contract (`model.detector`), `load_backbone`, the `AnomalyCLIP` module, prompt checkpoints (`load_prompts`,
`save_prompts`), and the preprocessing transforms in `model.preprocess`.

The names below are imported on first use, so `import model.factory` (e.g. to list the model names while
validating a config) loads neither torch nor any family; the built-in families register when first asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "model._backbone": ("BackboneError", "ClipBackbone", "load_backbone"),
    "model.anomalyclip": ("AnomalyCLIP", "PromptCheckpoint", "PromptLearner", "build_anomalyclip", "load_prompts",
                          "save_official", "save_prompts"),
    "model.checkpoints": ("CheckpointError",),
    "model.detector": ("Detector", "Prediction", "TorchDetector", "resolve_device", "resolve_dtype"),
    "model.factory": ("CheckpointFormat", "ModelFamily", "TrainingSpec", "create_detector", "get_family",
                      "list_models", "register_family", "register_model"),
    "model.fewshot": ("FewShotDetector", "ReferenceBank", "ReferencesError", "calibrate_threshold",
                      "with_references"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
