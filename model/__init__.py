"""anomalyd's model package: zero-shot anomaly detectors on frozen CLIP backbones, in pure PyTorch.

Public entry points: `create_detector` (by model name), `list_models`, `get_family` and the registration
functions of the model-family registry (`model.factory`, which says how to add a family), the `Detector`
contract (`model.detector`), `load_backbone`, the `AnomalyCLIP` module, prompt checkpoints (`load_prompts`,
`save_prompts`), and the preprocessing transforms in `model.preprocess`.
"""

# The built-in families register themselves with the factory when imported.
from model import adaclip as _adaclip  # noqa: F401
from model import baselines as _baselines  # noqa: F401
from model._backbone import BackboneError, ClipBackbone, load_backbone
from model.anomalyclip import (
    AnomalyCLIP,
    PromptCheckpoint,
    PromptLearner,
    build_anomalyclip,
    load_prompts,
    save_official,
    save_prompts,
)
from model.checkpoints import CheckpointError
from model.detector import Detector, Prediction, TorchDetector, resolve_device, resolve_dtype
from model.factory import (
    CheckpointFormat,
    ModelFamily,
    TrainingSpec,
    create_detector,
    get_family,
    list_models,
    register_family,
    register_model,
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
    "CheckpointFormat",
    "ClipBackbone",
    "Detector",
    "FewShotDetector",
    "ModelFamily",
    "Prediction",
    "PromptCheckpoint",
    "PromptLearner",
    "ReferenceBank",
    "ReferencesError",
    "TorchDetector",
    "TrainingSpec",
    "build_anomalyclip",
    "calibrate_threshold",
    "create_detector",
    "get_family",
    "list_models",
    "load_backbone",
    "load_prompts",
    "register_family",
    "register_model",
    "resolve_device",
    "resolve_dtype",
    "save_official",
    "save_prompts",
    "with_references",
]
