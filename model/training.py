"""Training the learned parts of a detector: one loop; each trainable family registers its training target
(optimiser, loss, weights I/O) and its official defaults (`model.factory.TrainingSpec`), e.g.
`model.anomalyclip.training`, `model.adaclip.training`.

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
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

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
        """The official settings of each model (its family's training defaults), with overrides (None values
        ignored)."""
        from model.factory import get_family

        training = get_family(name).training
        defaults: dict[str, Any] = dict(training.defaults) if training is not None else {}
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


class TrainingTarget(Protocol):
    """What a family's training target offers the loop (see e.g. `model.anomalyclip.training`)."""

    def optimizer(self) -> torch.optim.Optimizer: ...
    def loss(self, batch: Mapping[str, Any], device: torch.device) -> StepLoss: ...
    def state(self) -> dict[str, torch.Tensor]: ...
    def load_state(self, state: Mapping[str, torch.Tensor]) -> None: ...
    def save(self, output: Path, metadata: Mapping[str, Any]) -> None: ...
    def finish_epoch(self) -> None: ...


def _target(model: nn.Module, config: TrainingConfig) -> TrainingTarget:
    from model.factory import family_of

    family = family_of(model)
    return family.training.target(model, config)


def resume_path(output: Path) -> Path:
    return output.with_name(output.name + ".resume.pt")


def _collate(batch):
    from model.dataset_loading import collate_samples

    return collate_samples(batch)


def train_prompts(
    model: nn.Module,
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
    """Train the learned parts of `model` on `dataset` (items as `model.dataset_loading.InspectionDataset` gives them).

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
