"""How AnomalyCLIP trains: only the prompt learner (Adam, lr 1e-3, betas (0.5, 0.999), no weight decay, no
schedule, batch 8, 15 epochs, seed 111, as the official train.py), with the glocal loss."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from model.anomalyclip.checkpoint import save_prompts
from model.anomalyclip.loss import glocal_loss
from model.anomalyclip.model import AnomalyCLIP
from model.training import StepLoss, TrainingConfig

# The official recipe is `TrainingConfig`'s own defaults.
TRAINING_DEFAULTS: dict[str, Any] = {}


class AnomalyCLIPTarget:
    """The training target: its prompt learner, Adam, the glocal loss, the prompts file formats."""

    def __init__(self, model: AnomalyCLIP, config: TrainingConfig) -> None:
        self.model, self.config = model, config
        self.module = model.prompt_learner

    def optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.module.parameters(), lr=self.config.learning_rate, betas=self.config.betas,
                                weight_decay=self.config.weight_decay)

    def loss(self, batch: Mapping[str, Any], device: torch.device) -> StepLoss:
        images = batch["image"].to(device)
        output = self.model(images, with_probabilities=bool(batch["has_mask"].any()))
        loss = glocal_loss(output.image_logits, batch["label"].to(device), output.probabilities,
                           batch["mask"].to(device), local_weight=self.config.local_weight,
                           has_mask=batch["has_mask"].to(device))
        return StepLoss(loss.total, loss.image.item(), loss.local.item())

    def state(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.model.load_prompt_state(dict(state))

    def save(self, output: Path, metadata: Mapping[str, Any]) -> None:
        save_prompts(output, self.module.state_dict(), metadata)

    def finish_epoch(self) -> None:
        self.model.invalidate_text_cache()
