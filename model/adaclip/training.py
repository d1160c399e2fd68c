"""How AdaCLIP trains: prompts, dynamic generators and heads (AdamW lr 0.01, betas (0.5, 0.999), weight decay
0.01, 5 epochs), its focal + dice loss; real batches (the official code trains at batch 1). Class names come from
the batch's categories."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from model.adaclip.checkpoint import save_adaclip
from model.adaclip.loss import AdaCLIPLoss, adaclip_loss
from model.adaclip.model import AdaCLIP
from model.detector import autocast
from model.training import StepLoss, TrainingConfig

TRAINING_DEFAULTS: dict[str, Any] = {"epochs": 5, "batch_size": 8, "learning_rate": 0.01, "weight_decay": 0.01}


def build_optimizer(model: AdaCLIP, *, lr: float = 0.01, betas: tuple[float, float] = (0.5, 0.999),
                    weight_decay: float = 0.01) -> torch.optim.AdamW:
    """The official optimiser: AdamW over the learned parameters (lr 0.01, betas (0.5, 0.999), decay 0.01)."""
    return torch.optim.AdamW(model.learned_parameters(), lr=lr, betas=betas, weight_decay=weight_decay)


def training_step(
    model: AdaCLIP,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    class_names: Sequence[str],
    labels: torch.Tensor,
    masks: torch.Tensor | None,
    *,
    has_mask: torch.Tensor | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> AdaCLIPLoss:
    """One optimisation step on a batch (the official `train_one_batch`, batched). Parameters stay float32;
    `autocast_dtype` runs the forward under autocast (the official code uses fp16 on GPUs)."""
    model.train()
    with autocast(images.device, autocast_dtype):
        output = model(images, class_names)
    loss = adaclip_loss(model, output, labels, masks, has_mask=has_mask)
    optimizer.zero_grad(set_to_none=True)
    loss.total.backward()
    optimizer.step()
    return loss


class AdaCLIPTarget:
    """The training target: its learned modules, AdamW, its loss, its checkpoint format."""

    def __init__(self, model: AdaCLIP, config: TrainingConfig) -> None:
        self.model, self.config = model, config

    def optimizer(self) -> torch.optim.Optimizer:
        return build_optimizer(self.model, lr=self.config.learning_rate, betas=self.config.betas,
                               weight_decay=self.config.weight_decay)

    def loss(self, batch: Mapping[str, Any], device: torch.device) -> StepLoss:
        output = self.model(batch["image"].to(device), list(batch["category"]))
        loss = adaclip_loss(self.model, output, batch["label"].to(device), batch["mask"].to(device),
                            has_mask=batch["has_mask"].to(device))
        return StepLoss(loss.total, float(loss.classification), float(loss.segmentation))

    def state(self) -> dict[str, torch.Tensor]:
        return self.model.learned_state_dict()

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.model.load_learned_state(dict(state))

    def save(self, output: Path, metadata: Mapping[str, Any]) -> None:
        save_adaclip(self.model, output, class_names=metadata.get("class_names", ()), metadata=metadata)

    def finish_epoch(self) -> None:
        pass
