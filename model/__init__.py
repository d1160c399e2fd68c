"""anomalyd's model package: zero-shot anomaly detectors on frozen CLIP backbones, in pure PyTorch.

Public entry points: `create_detector` (by model name), `load_backbone`, the `AnomalyCLIP` module, prompt
checkpoints (`load_prompts`, `save_prompts`), and the preprocessing transforms in `model.preprocess`.
"""

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

__all__ = [
    "AnomalyCLIP",
    "BackboneError",
    "CheckpointError",
    "ClipBackbone",
    "Detector",
    "Prediction",
    "PromptCheckpoint",
    "PromptLearner",
    "build_anomalyclip",
    "create_detector",
    "list_models",
    "load_backbone",
    "load_prompts",
    "register_model",
    "resolve_device",
    "resolve_dtype",
    "save_official",
    "save_prompts",
]
