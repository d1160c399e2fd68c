"""Mutual scoring behind the Detector protocol, registered as model "mutual": no references, no labels.

Features are PatchCore's (model/patchcore: the frozen EfficientNet-Lite0, taps 4+10, 3x3 pooling, 256 px; a
bankless `PatchCoreDetector` embeds and maps), the scores are mutual (model/mutual/scoring.py):

- offline, over a set (`predict_set`, what `anomalyd eval --model mutual` calls per category): each image
  against the other images of the set;
- online (`predict`, the daemon's path for one source): each frame against a bounded rolling window of that
  source's recent normal-looking frames (model/mutual/window.py), then offered to the window.

Offline outputs are distances like PatchCore's (not 0-1). Online outputs are those distances divided by the
window's scale when the frame met it (`MutualWindow.distance_scale`: the alert point maps to ln 2; NaN, no
decision, while the window is not ready), which the daemon brings to 0-1 with PatchCore's rule, 1 - exp(-x)
(daemon/detectors/scale.py): the window's alert point is 0.5, the default threshold. Map = patch scores upsampled (nearest) and blurred (sigma 4), image
score = mean of the map's top 1 % pixels.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from model.detector import Prediction
from model.drift import DriftWatch
from model.factory import register_model
from model.mutual.scoring import FRACTION, TOP_FRACTION, WINDOW_FRACTION, mutual_patch_scores, top_mean
from model.mutual.window import ADMIT_RATIO, MutualWindow, WindowLimits
from model.patchcore.backbone import DEFAULT_BACKBONE, Tap
from model.patchcore.detector import DEFAULT_IMAGE_SIZE, PatchCoreDetector, build_patchcore, clip_to_tf

log = logging.getLogger("anomalyd.mutual")

NAME = "mutual"
# Offline: each image is compared with at most this many others of its set (spread evenly over it); MuSc's
# aggregation needs a few dozen, and the cost is linear in it (cubes: 188 images x 32 others ≈ 60 s, 1 thread).
MAX_OTHERS = 32


class MutualDetector:
    """Zero-shot mutual scoring on PatchCore's features (see the module docstring)."""

    name = NAME

    def __init__(self, features: PatchCoreDetector, *, fraction: float = FRACTION,
                 window_fraction: float = WINDOW_FRACTION, top_fraction: float = TOP_FRACTION,
                 max_others: int | None = MAX_OTHERS, window: WindowLimits = WindowLimits(),
                 admit_ratio: float = ADMIT_RATIO) -> None:
        self.features = features
        self.model = features.model
        self.device = features.device
        self.image_size = features.image_size
        self.fraction = float(fraction)
        self.window_fraction = float(window_fraction)
        self.top_fraction = float(top_fraction)
        self.max_others = max_others
        self.limits = window
        self.admit_ratio = float(admit_ratio)
        self.grid = (0, 0)
        self.window = self._new_window()
        self.drift = DriftWatch()  # whole-frame change vs defects (model/drift.py)
        self.label = ""  # who this window watches, for the log (the daemon sets "source <id>")
        self._lock = threading.Lock()

    def _new_window(self) -> MutualWindow:
        return MutualWindow(self.limits, fraction=self.window_fraction, admit_ratio=self.admit_ratio,
                            image_score=self._image_scores)

    def _image_scores(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """(B, P) patch scores → (B,) image scores (mean of the blurred map's top pixels), in chunks."""
        return torch.cat([self._prediction(patch_scores[i:i + 8].to(self.device), self.grid).scores.cpu()
                          for i in range(0, patch_scores.shape[0], 8)])

    def fork(self, window: WindowLimits | None = None) -> MutualDetector:
        """The same model (shared weights) with an empty window of its own (bounded by `window`, else by this
        detector's limits)."""
        return MutualDetector(self.features, fraction=self.fraction, window_fraction=self.window_fraction,
                              top_fraction=self.top_fraction, max_others=self.max_others,
                              window=window or self.limits, admit_ratio=self.admit_ratio)

    @property
    def version(self) -> str:
        taps = "-".join(str(t) for t in self.model.taps)
        return (f"mutual-{self.features.backbone_name}-t{taps}-s{self.image_size}"
                f"-w{self.limits.max_frames}-r{self.admit_ratio:g}")

    @property
    def distance_scale(self) -> float:
        """d0 of the daemon's 1 - exp(-raw / d0): online outputs are already in units of the window's scale."""
        return 1.0

    # -- shared steps ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 8) -> tuple[torch.Tensor, tuple[int, int]]:
        """CLIP-normalised images (B, 3, S, S) → (B, P, D) patch embeddings and their grid (h, w)."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images have shape {tuple(images.shape)}: mutual expects (B, 3, {self.image_size}, "
                             f"{self.image_size})")
        parts, grid = [], (0, 0)
        for start in range(0, images.shape[0], batch_size):
            batch = clip_to_tf(images[start:start + batch_size].to(self.device).float())
            with self.features._autocast():
                embedding = self.model.embed(batch).float()
            grid = self.grid = tuple(embedding.shape[-2:])
            parts.append(embedding.permute(0, 2, 3, 1).reshape(embedding.shape[0], -1, embedding.shape[1]))
        return torch.cat(parts), grid

    def _prediction(self, patch_scores: torch.Tensor, grid: tuple[int, int]) -> Prediction:
        maps = self.model.anomaly_maps(patch_scores, grid, (self.image_size, self.image_size))
        return Prediction(scores=top_mean(maps, self.top_fraction).float(), maps=maps.float())

    # -- offline -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_set(self, images: torch.Tensor) -> Prediction:
        """Raw scores and maps of a set of images (B >= 2) of one category, each against the others."""
        embeddings, grid = self.embed(images)
        scores = mutual_patch_scores(embeddings, fraction=self.fraction, max_others=self.max_others,
                                     max_elements=self.model.max_block_elements)
        return self._prediction(scores, grid)

    # -- online --------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_names: Sequence[str] | None = None) -> Prediction:
        """Each frame, in order, against the window (then offered to it): scores and maps in units of the window's
        scale (see the module docstring). A frame met while the window is not ready gets a NaN score (no decision:
        the daemon records it as such, never as a pass). `notes` say, per frame, whether it was decided and what the
        drift watch saw (`drifting`, the current excursion's first frame, a `drift_event` or `drift_cleared`)."""
        embeddings, grid = self.embed(images)
        with self._lock:
            rows, notes = [], []
            for patches in embeddings:
                scores = self.window.patch_scores(patches)
                scale = self.window.distance_scale  # the window's scale when the frame met it (inf: not judged)
                note: dict[str, Any] = {"decided": math.isfinite(scale)}
                image_score = float(self._prediction(scores[None], grid).scores[0])
                if self.window.ready:
                    self.drift.calibrate(self.window.own_patch_scores)
                    level = self.window.normal_level()
                    alerted = level is not None and image_score >= self.window.alert_ratio * level
                    note.update(self.drift.note(scores, alerted))
                    if "drift_event" in note:
                        event = self.drift.events[-1]
                        log.warning("%s: drift: %.0f %% of each frame's patches unmatched since frame %d of the "
                                    "window's stream (signalled at frame %d); these frames stay out of the window",
                                    self.label or "mutual", 100 * event.share, event.frame, event.detected_at)
                self.window.offer(patches, image_score)
                rows.append(scores / scale)
                notes.append(note)
        prediction = self._prediction(torch.stack(rows), grid)
        undecided = torch.tensor([not note["decided"] for note in notes], device=prediction.scores.device)
        prediction.scores[undecided] = math.nan
        prediction.notes = notes
        return prediction

    def load_references(self, *_: Any, **__: Any) -> None:
        """It has none to load: a k-shot run (`eval --shots`) is a PatchCore run; say so instead of ignoring them."""
        raise ValueError("mutual scoring uses no references (each image is scored against the others of its set): "
                         "drop --shots/--references, or use --model patchcore")

    set_references = load_references

    def reset(self) -> None:
        with self._lock:
            self.window = self._new_window()
            self.drift = DriftWatch()


def build_mutual(*, backbone: str = DEFAULT_BACKBONE, weights: str | Path | None = None,
                 taps: Sequence[Tap] | str | None = None, image_size: int = DEFAULT_IMAGE_SIZE,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_others: int | None = MAX_OTHERS, window: WindowLimits = WindowLimits(),
                 **options: Any) -> MutualDetector:
    features = build_patchcore(backbone=backbone, weights=weights, taps=taps, image_size=image_size, device=device,
                               dtype=dtype)
    return MutualDetector(features, max_others=max_others, window=window, **options)


# PatchCore's backbones, taps and input size; no references (each source forks its own window in the daemon).
# (its capabilities: model.factory.BUILTIN_FAMILIES)
@register_model(NAME, summary="zero-shot mutual scoring (MuSc) on PatchCore's features",
                window_limits=WindowLimits)
def _create_mutual(
    *,
    backbone: str = DEFAULT_BACKBONE,
    weights: str | Path | None = None,
    taps: Sequence[Tap] | str | None = None,
    layers: Sequence[Tap] | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    max_others: int | None = MAX_OTHERS,
    window_frames: int | None = None,
    window_max_bytes: int | None = None,
    window_max_age_s: float | None = None,
    device: torch.device,
    dtype: torch.dtype,
    **_: Any,
) -> MutualDetector:
    limits: dict[str, Any] = {}
    if window_frames is not None:
        limits["max_frames"] = int(window_frames)
    if window_max_bytes is not None:
        limits["max_bytes"] = int(window_max_bytes)
    if window_max_age_s is not None:
        limits["max_age_s"] = float(window_max_age_s)
    window = WindowLimits(**limits)
    return build_mutual(backbone=str(backbone), weights=weights, taps=taps or layers, image_size=int(image_size),
                        device=device, dtype=dtype, max_others=max_others, window=window)
