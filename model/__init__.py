"""anomalyd's model package: zero-shot anomaly detectors on frozen CLIP backbones, in pure PyTorch.

Public entry points: `create_detector` (by model name), `load_backbone`, the `AnomalyCLIP` module, prompt
checkpoints (`load_prompts`, `save_prompts`), and the preprocessing transforms in `model.preprocess`.
"""

# Models register themselves with the factory when imported.
from model import adaclip as _adaclip  # noqa: F401
from model import baselines as _baselines  # noqa: F401
from model import patchcore as _patchcore  # noqa: F401
from model._backbone import BackboneError, ClipBackbone, load_backbone
from model.anomalyclip import AnomalyCLIP, PromptLearner
from model.checkpoints import CheckpointError, PromptCheckpoint, load_prompts, save_official, save_prompts
from model.factory import (
    Detector,
    Prediction,
    build_anomalyclip,
    create_detector,
    list_models,
    register_model,
    resolve_device,
    resolve_dtype,
)
from model.fewshot import (
    FewShotDetector,
    ReferenceBank,
    ReferencesError,
    calibrate_threshold,
    with_references,
)

__all__ = [
    "AnomalyCLIP",
    "BackboneError",
    "CheckpointError",
    "ClipBackbone",
    "Detector",
    "FewShotDetector",
    "Prediction",
    "PromptCheckpoint",
    "PromptLearner",
    "ReferenceBank",
    "ReferencesError",
    "build_anomalyclip",
    "calibrate_threshold",
    "create_detector",
    "list_models",
    "load_backbone",
    "load_prompts",
    "register_model",
    "resolve_device",
    "resolve_dtype",
    "save_official",
    "save_prompts",
    "with_references",
]
