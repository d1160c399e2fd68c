"""Training the learned parts of a detector: one loop, with a small adapter per model.

- AnomalyCLIP: only the prompt learner trains (Adam, lr 1e-3, betas (0.5, 0.999), no weight decay, no schedule,
  batch 8, 15 epochs, seed 111, as the official train.py), glocal loss.
- AdaCLIP: prompts, dynamic generators and heads (AdamW lr 0.01, betas (0.5, 0.999), weight decay 0.01, 5 epochs),
  its focal + dice loss; real batches (the official code trains at batch 1).

Each epoch ends with the weights written to the output file and a resume file beside it (`<output>.resume.pt`:
optimizer state, epoch, history), so an interrupted run continues where it stopped with `resume=True`.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from model.anomalyclip import AnomalyCLIP
from model.checkpoints import save_prompts
from model.losses import glocal_loss

if TYPE_CHECKING:
    from model.adaclip import AdaCLIP

log = logging.getLogger(__name__)


@dataclass
class TrainingConfig:
    epochs: int = 15
    batch_size: int = 8
    learning_rate: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = 111
    local_weight: float = 4.0
    weight_decay: float = 0.0
    num_workers: int = 0

    @classmethod
    def for_model(cls, name: str, **overrides: Any) -> TrainingConfig:
        """The official settings of each model, with overrides (None values ignored)."""
        defaults: dict[str, Any] = {}
        if name == "adaclip":
            defaults = {"epochs": 5, "batch_size": 8, "learning_rate": 0.01, "weight_decay": 0.01}
        defaults.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**defaults)


@dataclass
class EpochStats:
    epoch: int
    loss: float
    image_loss: float
    local_loss: float
    samples: int
    skipped: list[tuple[str, str]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


@dataclass
class StepLoss:
    total: torch.Tensor
    image: float
    local: float


class _AnomalyCLIPTarget:
    """How to train AnomalyCLIP: its prompt learner, Adam, the glocal loss, the prompts file formats."""

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


class _AdaCLIPTarget:
    """How to train AdaCLIP: its learned modules, AdamW, its loss; class names come from the batch's categories."""

    def __init__(self, model: AdaCLIP, config: TrainingConfig) -> None:
        self.model, self.config = model, config

    def optimizer(self) -> torch.optim.Optimizer:
        from model.adaclip import build_optimizer

        return build_optimizer(self.model, lr=self.config.learning_rate, betas=self.config.betas,
                               weight_decay=self.config.weight_decay)

    def loss(self, batch: Mapping[str, Any], device: torch.device) -> StepLoss:
        from model.adaclip import adaclip_loss

        output = self.model(batch["image"].to(device), list(batch["category"]))
        loss = adaclip_loss(self.model, output, batch["label"].to(device), batch["mask"].to(device),
                            has_mask=batch["has_mask"].to(device))
        return StepLoss(loss.total, float(loss.classification), float(loss.segmentation))

    def state(self) -> dict[str, torch.Tensor]:
        return self.model.learned_state_dict()

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.model.load_learned_state(dict(state))

    def save(self, output: Path, metadata: Mapping[str, Any]) -> None:
        from model.adaclip import save_adaclip

        save_adaclip(self.model, output, class_names=metadata.get("class_names", ()), metadata=metadata)

    def finish_epoch(self) -> None:
        pass


def _target(model: Any, config: TrainingConfig):
    if isinstance(model, AnomalyCLIP):
        return _AnomalyCLIPTarget(model, config)
    from model.adaclip import AdaCLIP

    if isinstance(model, AdaCLIP):
        return _AdaCLIPTarget(model, config)
    raise TypeError(f"no training is defined for {type(model).__name__}")


def resume_path(output: Path) -> Path:
    return output.with_name(output.name + ".resume.pt")


def _collate(batch):
    from model.datasets import collate_samples

    return collate_samples(batch)


def train_prompts(
    model: AnomalyCLIP | AdaCLIP,
    dataset: Dataset,
    output: str | Path,
    *,
    config: TrainingConfig | None = None,
    device: torch.device | str = "cpu",
    resume: bool = True,
    progress: bool = True,
    metadata: Mapping[str, Any] | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> list[EpochStats]:
    """Train the learned parts of `model` on `dataset` (items as `model.datasets.InspectionDataset` gives them).

    Bad samples are reported in the epoch stats and skipped; images without a pixel mask train the global loss only.
    Returns the stats of every epoch (those of earlier runs included when resuming).
    """
    from tqdm.auto import tqdm

    config = config or TrainingConfig()
    output = Path(output)
    device = torch.device(device)
    seed_everything(config.seed)
    model.to(device)
    target = _target(model, config)
    optimizer = target.optimizer()
    history: list[EpochStats] = []
    start_epoch = 0
    state_file = resume_path(output)
    if resume and state_file.is_file():
        state = torch.load(state_file, map_location=device, weights_only=True)
        target.load_state(state["weights"])
        optimizer.load_state_dict(state["optimizer"])
        history = [EpochStats(**{**item, "skipped": [tuple(s) for s in item["skipped"]]}) for item in state["history"]]
        start_epoch = int(state["epoch"])
        log.info("resuming %s after epoch %d", output, start_epoch)

    for epoch in range(start_epoch, config.epochs):
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        generator = torch.Generator().manual_seed(config.seed + epoch)
        loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=generator,
                            num_workers=config.num_workers, collate_fn=_collate)
        model.train()
        totals = {"loss": 0.0, "image": 0.0, "local": 0.0}
        seen = 0
        skipped: list[tuple[str, str]] = []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False)
        for batch in bar:
            for path, message in batch["errors"]:
                log.warning("skipping %s: %s", path, message)
            skipped.extend(batch["errors"])
            if batch["image"].shape[0] == 0:
                continue
            loss = target.loss(batch, device)
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            optimizer.step()
            count = batch["image"].shape[0]
            seen += count
            totals["loss"] += loss.total.item() * count
            totals["image"] += loss.image * count
            totals["local"] += loss.local * count
            bar.set_postfix(loss=f"{loss.total.item():.4f}", image=f"{loss.image:.4f}")
        model.eval()
        target.finish_epoch()
        stats = EpochStats(
            epoch=epoch + 1,
            loss=totals["loss"] / seen if seen else math.nan,
            image_loss=totals["image"] / seen if seen else math.nan,
            local_loss=totals["local"] / seen if seen else math.nan,
            samples=seen,
            skipped=skipped,
        )
        history.append(stats)
        meta = dict(metadata or {})
        meta.update({"epochs_done": epoch + 1, "history": [asdict(h) | {"skipped": len(h.skipped)} for h in history]})
        target.save(output, meta)
        torch.save(
            {"epoch": epoch + 1, "weights": target.state(),
             "optimizer": optimizer.state_dict(), "history": [asdict(h) for h in history]},
            state_file,
        )
        log.info("epoch %d/%d: loss %.4f (image %.4f, local %.4f) on %d images, %d skipped",
                 epoch + 1, config.epochs, stats.loss, stats.image_loss, stats.local_loss, seen, len(skipped))
        if on_epoch is not None:
            on_epoch(stats)
    return history
