"""`patchcore-head`: PatchCore (model/patchcore) plus a head learned from labelled frames, behind the Detector
protocol (its safetensors checkpoint: checkpoint.py); registered as a model family.

The detector holds a `PatchCoreDetector` (backbone, taps, memory bank of the references, nearest-neighbour
search: all PatchCore's own) and a `PatchcoreHead`. Per frame: PatchCore's embedding and cell distances, then the
head's cell logits; the map is their sigmoid, upsampled bilinearly to the input and blurred like PatchCore's
(Gaussian, sigma 4), the image score the sigmoid of the mean of the top-k cell logits. Both are on the daemon's
0–1 scale already. Without a trained head the head is the untrained one (a monotone function of the distance, see
head.py), so it ranks like PatchCore.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from model.checkpoints import CheckpointError
from model.detector import Prediction
from model.factory import CheckpointFormat, LabelLearning, ModelFamily, imported_later, register_family
from model.gaussian import gaussian_blur
from model.geometry import Geometry, predict_frames
from model.patchcore import PatchCoreDetector, clip_to_tf
from model.patchcore.detector import DEFAULT_IMAGE_SIZE
from model.supervised.checkpoint import NAME, HeadCheckpoint
from model.supervised.head import PatchcoreHead
from model.supervised.training import HeadTrainingConfig, train_head, training_inputs

SIGMA = 4.0
# What a head was trained on top of: a head is refused by a PatchCore of another backbone, taps or size.
IDENTITY_KEYS = ("backbone", "weights", "taps", "image_size")


class PatchcoreHeadDetector:
    """PatchCore's bank and distances, the learned head's map and score (see the module docstring)."""

    name = NAME

    def __init__(self, patchcore: PatchCoreDetector, checkpoint: HeadCheckpoint | None = None) -> None:
        self.patchcore = patchcore
        self.checkpoint: HeadCheckpoint | None = None
        self.set_checkpoint(checkpoint)

    # -- what it is ----------------------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.patchcore.image_size

    @property
    def device(self) -> torch.device:
        return self.patchcore.device

    @property
    def identity(self) -> dict[str, str]:
        return {key: self.patchcore.identity[key] for key in IDENTITY_KEYS}

    @property
    def version(self) -> str:
        # "h0": no head, or the untrained one (made on the first predict; its random layers do not change its
        # output, so they must not change the version: thresholds and exports are kept per version)
        trained = self.checkpoint is not None and not self.checkpoint.metadata.get("untrained")
        head = f"h{self.checkpoint.digest()}" if trained else "h0"
        return f"{NAME}-{head}-{self.patchcore.version.removeprefix('patchcore-')}"

    @property
    def geometry(self) -> Geometry:
        """PatchCore's frame geometry: the head scores the same inputs (squash, or fit with each frame's shape)."""
        return self.patchcore.geometry

    @geometry.setter
    def geometry(self, geometry: Geometry) -> None:
        self.patchcore.geometry = geometry

    @property
    def batch_size(self) -> int:
        return self.patchcore.batch_size

    @property
    def head(self) -> PatchcoreHead | None:
        return self.checkpoint.head if self.checkpoint is not None else None

    def set_checkpoint(self, checkpoint: HeadCheckpoint | None, origin: str = "head") -> None:
        """Use a trained head (None: the untrained one, which ranks like PatchCore)."""
        if checkpoint is not None:
            for key, expected in self.identity.items():
                found = str(checkpoint.metadata.get(key))
                if found != expected:
                    raise CheckpointError(f"{origin}: the head was trained on PatchCore with {key} {found!r}, "
                                          f"this detector uses {expected!r}")
            trained = str(checkpoint.metadata.get("geometry", "squash")).split("-")[0]  # heads from before: squash
            if trained != self.geometry.resize:
                raise CheckpointError(f"{origin}: the head was trained on resize {trained!r} frames, this detector "
                                      f"uses resize {self.geometry.resize!r}")
            checkpoint.head.to(self.device).eval()
        self.checkpoint = checkpoint

    def untrained_checkpoint(self) -> HeadCheckpoint:
        channels = int(self.patchcore.model.embed(torch.zeros(1, 3, 64, 64, device=self.device)).shape[1])
        return HeadCheckpoint(PatchcoreHead(channels).to(self.device).eval(), 1.0, {**self.identity, "untrained": True})

    # -- references: PatchCore's own ------------------------------------------------------------------------------
    def set_references(self, images: torch.Tensor, **options: Any) -> Any:
        return self.patchcore.set_references(images, **options)

    def load_references(self, references: Any, **options: Any) -> Any:
        return self.patchcore.load_references(references, **options)

    @property
    def bank(self) -> Any:
        return self.patchcore.bank

    # -- inference -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_names: Sequence[str] | None = None) -> Prediction:
        size = self.image_size
        any_shape = self.geometry.resize != "squash"  # fit: each frame's own (stride-rounded) shape
        if images.ndim != 4 or images.shape[1] != 3 or (images.shape[-2:] != (size, size) and not any_shape):
            raise ValueError(f"images have shape {tuple(images.shape)}: {NAME} expects (B, 3, {size}, {size})")
        if self.checkpoint is None:
            self.checkpoint = self.untrained_checkpoint()
        if self.patchcore.bank is None:
            self.patchcore.predict_tf(images[:0])  # raises PatchCore's "no memory bank" error
        tf = clip_to_tf(images.to(self.device, non_blocking=True).float())
        embedding = self.patchcore.model.embed(tf).float()
        batch, _, height, width = embedding.shape
        distances = self.patchcore.model.patch_scores(embedding)[0].reshape(batch, height, width)
        head = self.checkpoint.head
        logits = head(embedding, distances / self.checkpoint.distance_scale)
        scores = torch.sigmoid(head.image_logits(logits))
        maps = F.interpolate(torch.sigmoid(logits).unsqueeze(1), size=tuple(images.shape[-2:]), mode="bilinear",
                             align_corners=False)
        maps = gaussian_blur(maps, SIGMA, padding="reflect")[:, 0]
        return Prediction(scores=scores.float(), maps=maps.float().clamp(0, 1))

    @torch.no_grad()
    def predict_frames(self, frames: Sequence[Any]) -> tuple[Any, list[Any]]:
        """(image scores, maps in each frame's own pixels) of RGB uint8 frames of any size, under the geometry."""
        return predict_frames(self, frames, self.geometry, batch_size=self.batch_size)


def fit_head(detector: PatchcoreHeadDetector, references: torch.Tensor | Sequence[torch.Tensor],
             anomalies: torch.Tensor | Sequence[torch.Tensor], masks: torch.Tensor | Sequence[torch.Tensor],
             has_mask: torch.Tensor, config: HeadTrainingConfig | None = None,
             metadata: Mapping[str, Any] | None = None,
             normals: torch.Tensor | Sequence[torch.Tensor] | None = None) -> HeadCheckpoint:
    """Train a head for `detector` and use it. `references` (K, 3, S, S) become its bank; `anomalies` (N, 3, S, S)
    with `masks` (N, S, S) where `has_mask` (N,) is True (else image label only); `normals`: further frames
    labelled normal (not in the bank: e.g. false alarms an operator labelled). Returns the checkpoint.

    With a fit geometry (the detector's PatchCore), each of them is a list of frames of their own shapes
    ((3, h, w) inputs, (h, w) masks: model/supervised/frames.py cuts them)."""
    config = config or HeadTrainingConfig()
    geometry = detector.geometry
    if geometry.resize == "squash" and not config.thin_per_reference:
        if not isinstance(references, torch.Tensor):  # frames cut through an ROI: all S x S
            references, anomalies, masks, normals = (
                None if v is None else v if isinstance(v, torch.Tensor) else _stacked(v, like)
                for v, like in ((references, (3,)), (anomalies, (3,)), (masks, ()), (normals, (3,))))
        detector.set_references(references)
        inputs = training_inputs(detector.patchcore, references, anomalies, masks, has_mask,
                                 synthetic_per_reference=config.synthetic_per_reference, seed=config.seed,
                                 normals=normals)
        buckets, counts = inputs, inputs.counts
    else:
        from model.supervised.frames import as_batches, frame_training_inputs, frames_of

        reference_frames = frames_of(references)
        detector.set_references(as_batches(reference_frames))
        buckets, counts = frame_training_inputs(
            detector.patchcore, reference_frames, frames_of(anomalies), list(masks), has_mask,
            synthetic_per_reference=config.synthetic_per_reference, seed=config.seed,
            normals=frames_of(normals) if normals is not None else None,
            thin_per_reference=config.thin_per_reference)
    head, d0 = train_head(buckets, config)
    summary = {**detector.identity, "geometry": geometry.bank_tag or "squash", "training": config.as_dict(),
               "items": counts, **(metadata or {})}
    checkpoint = HeadCheckpoint(head, d0, summary)
    detector.set_checkpoint(checkpoint)
    return checkpoint


def _stacked(frames: Sequence[torch.Tensor], channels: tuple[int, ...]) -> torch.Tensor:
    frames = [f[0] if f.ndim == len(channels) + 3 else f for f in frames]
    return torch.stack(frames) if frames else torch.zeros(0, *channels, 1, 1)


def load_head(path: str | Path) -> HeadCheckpoint:
    return HeadCheckpoint.load(path)


def save_head(module: Any, path: str | Path, metadata: Mapping[str, Any]) -> Path:
    """CheckpointFormat.save: `module` a HeadCheckpoint (or a bare head, with distance_scale in metadata)."""
    if isinstance(module, HeadCheckpoint):
        return module.save(path)
    return HeadCheckpoint(module, float(metadata.get("distance_scale", 1.0)), metadata).save(path)


def create_patchcore_head(*, head: str | Path | None = None, prompts: str | Path | None = None, weights: str | Path | None = None,
                          image_size: int = DEFAULT_IMAGE_SIZE, references: Any = None,
                          references_cache: str | Path | None = None, references_later: bool = False,
                          device: torch.device, dtype: torch.dtype, **options: Any) -> PatchcoreHeadDetector:
    """PatchCore built from the same options as `patchcore` (backbone, weights, taps, augment, ...), plus
    `head`: a trained head checkpoint, or a version's file of one head per resize mode (the head of this detector's
    geometry is used; model/supervised/head_set.py) (None: the untrained head, ranking like PatchCore); `prompts`,
    a model version's weights file as the daemon passes it to every family, is the same."""
    head = head if head is not None else prompts
    from model.factory import get_family

    patchcore = get_family("patchcore").create(weights=weights, image_size=image_size, references=references,
                                  references_cache=references_cache, references_later=references_later,
                                  device=device, dtype=dtype, **options)
    detector = PatchcoreHeadDetector(patchcore)
    checkpoint = None
    if head is not None:  # a version's file may hold one head per resize mode: this detector's mode's
        from model.supervised.head_set import version_head

        checkpoint = version_head(head, detector.geometry.resize, str(head))
    detector.set_checkpoint(checkpoint, str(head))
    return detector


register_family(ModelFamily(
    name=NAME, create=create_patchcore_head,  # capabilities: model.factory.BUILTIN_FAMILIES
    summary="PatchCore on EfficientNet-Lite0 plus a head learned from labelled frames (model/supervised/)",
    checkpoint=CheckpointFormat(load=load_head, save=save_head),
    exporter=imported_later("model.supervised.export", "patchcore_head_graph"),
    fit_samples=imported_later("model.supervised.fitting", "fit_samples"),
    known_good=imported_later("model.supervised.known_good", "head_known_good"),
    label_learning=LabelLearning(
        source_inputs=imported_later("model.supervised.label_learning", "source_inputs"),
        fit=imported_later("model.supervised.label_learning", "fit"),
        load=imported_later("model.supervised.head_set", "load_heads"),
        scorer=imported_later("model.supervised.label_learning", "scorer"),
        few_shot=imported_later("model.supervised.evaluation", "category_detector")),
))
