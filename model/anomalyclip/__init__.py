"""AnomalyCLIP (Zhou et al., ICLR 2024), cut by job like every family: `model` (the module), `checkpoint` (the
official `.pth` and anomalyd prompt files), `loss` (glocal loss), `training` (training target), `family` (builder,
detector, registration)."""

from model.anomalyclip.checkpoint import PromptCheckpoint, load_prompts, save_official, save_prompts
from model.anomalyclip.family import AnomalyCLIPDetector, build_anomalyclip, create_anomalyclip
from model.anomalyclip.loss import GlocalLoss, glocal_loss
from model.anomalyclip.model import (
    ANOMALOUS_TEMPLATE,
    NORMAL_TEMPLATE,
    TEMPERATURE,
    AnomalyCLIP,
    AnomalyCLIPOutput,
    PromptLearner,
)

__all__ = [
    "ANOMALOUS_TEMPLATE",
    "NORMAL_TEMPLATE",
    "TEMPERATURE",
    "AnomalyCLIP",
    "AnomalyCLIPDetector",
    "AnomalyCLIPOutput",
    "GlocalLoss",
    "PromptCheckpoint",
    "PromptLearner",
    "build_anomalyclip",
    "create_anomalyclip",
    "glocal_loss",
    "load_prompts",
    "save_official",
    "save_prompts",
]
