"""AdaCLIP (Cao et al., ECCV 2024), cut by job like every family: `model` (the module), `prompts` (class-aware
text prompts), `kmeans` (hybrid semantic fusion's clustering), `loss`, `training` (optimiser, step, training
target), `checkpoint` (official `.pth` and anomalyd files), `family` (builder, detector, registration)."""

from model.adaclip.checkpoint import (
    FORMAT_NAME,
    OFFICIAL_PREFIX,
    AdaCLIPCheckpoint,
    export_official,
    load_adaclip_checkpoint,
    model_metadata,
    save_adaclip,
)
from model.adaclip.family import AdaCLIPDetector, build_adaclip, create_adaclip
from model.adaclip.kmeans import kmeans, kmeans_plus_plus
from model.adaclip.loss import AdaCLIPLoss, adaclip_loss
from model.adaclip.model import LEARNED_MODULES, LOGIT_SCALE, AdaCLIP, AdaCLIPOutput, default_taps
from model.adaclip.prompts import ClassNameError, class_prompts
from model.adaclip.training import build_optimizer, training_step

__all__ = [
    "FORMAT_NAME",
    "LEARNED_MODULES",
    "LOGIT_SCALE",
    "OFFICIAL_PREFIX",
    "AdaCLIP",
    "AdaCLIPCheckpoint",
    "AdaCLIPDetector",
    "AdaCLIPLoss",
    "AdaCLIPOutput",
    "ClassNameError",
    "adaclip_loss",
    "build_adaclip",
    "build_optimizer",
    "class_prompts",
    "create_adaclip",
    "default_taps",
    "export_official",
    "kmeans",
    "kmeans_plus_plus",
    "load_adaclip_checkpoint",
    "model_metadata",
    "save_adaclip",
    "training_step",
]
