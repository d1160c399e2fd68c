"""Training the PatchCore head (model/supervised/head.py) from labelled frames and synthetic defects.

The frozen parts are computed once: the PatchCore embedding (B, D, h, w) and nearest-neighbour distance (B, h, w)
of every training frame, with the detector's own `embed` and `nearest_neighbor` (model/patchcore). The reference
frames are in the memory bank, so their own distances would be 0; they and the synthetic defects made on them are
scored leave-one-out, against the bank rows of the other references, as an unseen good frame would be.

Training items, in this order (all on the first tap's grid; a cell's target is 1 where any mask pixel in it is set):
- normal frames (the references, leave-one-out): every cell 0, image 0;
- anomalous frames with a mask: cells from the mask, image 1;
- anomalous frames with the image label alone (weak): image 1 only, the image logit being the mean of the top-k
  cell logits;
- synthetic defects (model/synthetic.py) on the references: cells from their masks, image 1.
Loss: focal + soft dice on the cells with a known target, BCE on the image logit; real frames weigh `real_weight`
times a synthetic one. Adam, mini-batches drawn with a seeded generator: the same inputs and seed give the same
weights (CPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.patchcore import PatchCoreDetector, PatchcoreModel, clip_to_tf, nearest_neighbor
from model.preprocess import OPENAI_MEAN, OPENAI_STD
from model.supervised.head import PatchcoreHead


@dataclass
class HeadTrainingConfig:
    steps: int = 100
    batch_size: int = 16
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    synthetic_per_reference: int = 3
    # thin crack-like synthetic defects per reference (model/supervised/frames.py: thin_crack); 0: none
    thin_per_reference: int = 0
    focal_gamma: float = 2.0
    real_weight: float = 6.0
    hidden: int = 32
    kernel: int = 3
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class HeadInputs:
    """Precomputed training items: embeddings (N, D, h, w), distances (N, h, w), labels (N,), cell targets
    (N, h, w), has_mask (N,) bool, real (N,) bool (False: synthetic)."""

    embeddings: torch.Tensor
    distances: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor
    has_mask: torch.Tensor
    real: torch.Tensor
    counts: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def concat(parts: Sequence[HeadInputs]) -> HeadInputs:
        counts: dict[str, int] = {}
        for part in parts:
            for key, value in part.counts.items():
                counts[key] = counts.get(key, 0) + value
        return HeadInputs(*(torch.cat([getattr(p, name) for p in parts]) for name in
                            ("embeddings", "distances", "labels", "targets", "has_mask", "real")), counts=counts)


@torch.no_grad()
def embed_images(detector: PatchCoreDetector, images: torch.Tensor) -> torch.Tensor:
    """PatchCore embeddings (N, D, h, w) of CLIP-normalised images (N, 3, S, S), in the detector's batches."""
    model: PatchcoreModel = detector.model
    parts = [model.embed(clip_to_tf(images[i:i + detector.batch_size].to(detector.device).float())).float().cpu()
             for i in range(0, images.shape[0], detector.batch_size)]
    return torch.cat(parts) if parts else torch.empty(0)


@torch.no_grad()
def bank_distances(detector: PatchCoreDetector, embeddings: torch.Tensor) -> torch.Tensor:
    """(N, h, w) distance of each cell to the detector's memory bank."""
    n, _, h, w = embeddings.shape
    distances = [detector.model.patch_scores(embeddings[i:i + 1].to(detector.device))[0].cpu()
                 for i in range(n)]
    return torch.cat(distances).reshape(n, h, w)


@torch.no_grad()
def leave_one_out_distances(reference_embeddings: torch.Tensor, embeddings: torch.Tensor,
                            owners: Sequence[int]) -> torch.Tensor:
    """(N, h, w): each embedding's cell distances to the rows of every reference but `owners[i]`."""
    k = reference_embeddings.shape[0]
    rows = PatchcoreModel.flatten(reference_embeddings).reshape(k, -1, reference_embeddings.shape[1])
    n, _, h, w = embeddings.shape
    out = torch.empty(n, h, w)
    for owner in sorted(set(owners)):
        bank = torch.cat([rows[j] for j in range(k) if j != owner]) if k > 1 else rows[0]
        which = [i for i, o in enumerate(owners) if o == owner]
        queries = PatchcoreModel.flatten(embeddings[which])
        distances, _ = nearest_neighbor(queries, bank)
        out[which] = distances.reshape(len(which), h, w)
    return out


def cell_targets(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(N, S, S) {0,1} masks → (N, h, w): 1 where any pixel of the cell is set."""
    if masks.numel() == 0:
        return torch.zeros(0, *grid)
    return F.adaptive_max_pool2d(masks.float().unsqueeze(1), grid)[:, 0]


def to_rgb(images: torch.Tensor) -> list[np.ndarray]:
    """CLIP-normalised (N, 3, S, S) → RGB uint8 arrays (S, S, 3) (exact for images made from uint8 pixels)."""
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    values = ((images.cpu().float() * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)
    return [array for array in values.permute(0, 2, 3, 1).contiguous().numpy()]


def synthetic_defects(references: torch.Tensor, per_reference: int, seed: int
                      ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(images, masks, owner reference index) of `per_reference` synthetic defects on each reference."""
    from model.synthetic import SyntheticAnomalies

    if per_reference <= 0 or references.shape[0] == 0:
        size = references.shape[-1]
        return torch.zeros(0, 3, size, size), torch.zeros(0, size, size), []
    dataset = SyntheticAnomalies(to_rgb(references), image_size=references.shape[-1], p_anomaly=1.0, seed=seed)
    images, masks, owners = [], [], []
    for epoch in range(per_reference):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            item = dataset[index]
            images.append(item["image"])
            masks.append(item["mask"])
            owners.append(index)
    return torch.stack(images), torch.stack(masks), owners


def training_inputs(detector: PatchCoreDetector, references: torch.Tensor, anomalies: torch.Tensor,
                    masks: torch.Tensor, has_mask: torch.Tensor, *, synthetic_per_reference: int,
                    seed: int, normals: torch.Tensor | None = None) -> HeadInputs:
    """All training items for a detector whose bank holds `references` (CLIP-normalised (K, 3, S, S)).

    `anomalies` (N, 3, S, S) with `masks` (N, S, S) where `has_mask` (N,) (weak items: image label only);
    `normals`: frames labelled normal that are not references (e.g. labelled false alarms), scored by the bank."""
    ref_embeddings = embed_images(detector, references)
    k, _, h, w = ref_embeddings.shape
    grid = (h, w)
    parts = [HeadInputs(ref_embeddings, leave_one_out_distances(ref_embeddings, ref_embeddings, list(range(k))),
                        torch.zeros(k), torch.zeros(k, h, w), torch.ones(k, dtype=torch.bool),
                        torch.ones(k, dtype=torch.bool), counts={"normal": k})]
    images, synthetic_masks, owners = synthetic_defects(references, synthetic_per_reference, seed)
    if owners:
        embeddings = embed_images(detector, images)
        m = len(owners)
        parts.append(HeadInputs(embeddings, leave_one_out_distances(ref_embeddings, embeddings, owners),
                                torch.ones(m), cell_targets(synthetic_masks, grid), torch.ones(m, dtype=torch.bool),
                                torch.zeros(m, dtype=torch.bool), counts={"synthetic": m}))
    if anomalies.shape[0]:
        embeddings = embed_images(detector, anomalies)
        n = anomalies.shape[0]
        parts.append(HeadInputs(embeddings, bank_distances(detector, embeddings), torch.ones(n),
                                cell_targets(masks, grid), has_mask.bool(), torch.ones(n, dtype=torch.bool),
                                counts={"anomalous_masked": int(has_mask.sum()),
                                        "anomalous_weak": int((~has_mask.bool()).sum())}))
    if normals is not None and normals.shape[0]:
        embeddings = embed_images(detector, normals)
        n = normals.shape[0]
        parts.append(HeadInputs(embeddings, bank_distances(detector, embeddings), torch.zeros(n),
                                torch.zeros(n, h, w), torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool),
                                counts={"normal_labelled": n}))
    return HeadInputs.concat(parts)


def distance_scale(inputs: HeadInputs | Sequence[HeadInputs]) -> float:
    """d0: the median leave-one-out cell distance of the normal frames (the unit of the head's distance input)."""
    buckets = [inputs] if isinstance(inputs, HeadInputs) else list(inputs)
    normal = torch.cat([b.distances[(b.labels == 0) & b.real].flatten() for b in buckets])
    value = float(normal.median()) if normal.numel() else 1.0
    return value if math.isfinite(value) and value > 0 else 1.0


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-element focal loss (Lin et al. 2017) on logits."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_true = torch.exp(-bce)
    return (1 - p_true).pow(gamma) * bce


def loss_terms(head: PatchcoreHead, embeddings: torch.Tensor, z: torch.Tensor, labels: torch.Tensor,
               targets: torch.Tensor, has_mask: torch.Tensor, weights: torch.Tensor, gamma: float
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-item (loss, weight) pairs of one batch of one grid: [image BCE, cell focal (masked items), dice (masked
    items with a defect)]; `combine_terms` turns those of one or more grids into the loss."""
    logits = head(embeddings, z)
    image = F.binary_cross_entropy_with_logits(head.image_logits(logits), labels, reduction="none")
    terms = [(image, weights)]
    empty = logits.new_zeros(0)
    focal, focal_weights, dice, dice_weights = empty, empty, empty, empty
    if bool(has_mask.any()):
        cell_logits, cell_targets_, cell_weights = logits[has_mask], targets[has_mask], weights[has_mask]
        focal, focal_weights = focal_loss(cell_logits, cell_targets_, gamma).flatten(1).mean(1), cell_weights
        positive = cell_targets_.flatten(1).sum(1) > 0
        if bool(positive.any()):
            probs = torch.sigmoid(cell_logits[positive]).flatten(1)
            truth = cell_targets_[positive].flatten(1)
            dice = 1 - (2 * (probs * truth).sum(1) + 1) / (probs.sum(1) + truth.sum(1) + 1)
            dice_weights = cell_weights[positive]
    return [*terms, (focal, focal_weights), (dice, dice_weights)]


def combine_terms(groups: Sequence[list[tuple[torch.Tensor, torch.Tensor]]]) -> torch.Tensor:
    """The loss: weighted image BCE + 10 x weighted focal + weighted dice over all items of all grids."""
    loss = torch.zeros(())
    for position, factor in ((0, 1.0), (1, 10.0), (2, 1.0)):
        values = torch.cat([g[position][0] for g in groups])
        weights = torch.cat([g[position][1] for g in groups])
        if values.numel():
            term = (weights * values).sum() / weights.sum()
            loss = term if position == 0 else loss + factor * term
    return loss


def head_loss(head: PatchcoreHead, embeddings: torch.Tensor, z: torch.Tensor, labels: torch.Tensor,
              targets: torch.Tensor, has_mask: torch.Tensor, weights: torch.Tensor, gamma: float) -> torch.Tensor:
    return combine_terms([loss_terms(head, embeddings, z, labels, targets, has_mask, weights, gamma)])


def train_head(inputs: HeadInputs | Sequence[HeadInputs], config: HeadTrainingConfig | None = None
               ) -> tuple[PatchcoreHead, float]:
    """(trained head, d0) from precomputed items, one HeadInputs per grid shape (fit geometry: frames of several
    shapes); deterministic given `config.seed`."""
    config = config or HeadTrainingConfig()
    torch.manual_seed(config.seed)
    buckets = [inputs] if isinstance(inputs, HeadInputs) else [b for b in inputs if b.labels.numel()]
    labels = torch.cat([b.labels for b in buckets])
    real = torch.cat([b.real for b in buckets])
    d0 = distance_scale(buckets)
    head = PatchcoreHead(buckets[0].embeddings.shape[1], hidden=config.hidden, kernel=config.kernel)
    normals = [b.embeddings[(b.labels == 0) & b.real] for b in buckets]
    normals = [e for e in normals if e.shape[0]]
    head.set_feature_statistics(normals[0] if len(normals) == 1 else normals if normals
                                else [b.embeddings for b in buckets])
    zs = [b.distances / d0 for b in buckets]
    weights = torch.where(real, torch.tensor(config.real_weight), torch.tensor(1.0))
    # Balance the classes: the two labels weigh the same in total.
    for label in (0.0, 1.0):
        chosen = labels == label
        if bool(chosen.any()):
            weights[chosen] = weights[chosen] / weights[chosen].sum() * (weights.sum() / 2)
    starts = torch.tensor([0] + [b.labels.shape[0] for b in buckets]).cumsum(0)
    optimiser = torch.optim.AdamW(head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    n = labels.shape[0]
    head.train()
    for _ in range(config.steps):
        batch = torch.randperm(n, generator=generator)[:config.batch_size]
        groups = []
        for index, bucket in enumerate(buckets):
            chosen = batch[(batch >= starts[index]) & (batch < starts[index + 1])]
            if chosen.numel() == 0:
                continue
            local = chosen - starts[index]
            groups.append(loss_terms(head, bucket.embeddings[local], zs[index][local], bucket.labels[local],
                                     bucket.targets[local], bucket.has_mask[local], weights[chosen],
                                     config.focal_gamma))
        loss = combine_terms(groups)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    head.eval()
    return head, d0
