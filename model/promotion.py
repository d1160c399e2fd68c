"""The metrics a retraining run's candidate and the active model are compared on: the held-out labelled frames
scored by each model. The decision on them (`[retraining].rule` on `metric`, the operating-point gate) and its
record are the daemon's (daemon/learning/promotion.py); what is measured is the family's, with these defaults:

- `holdout_metrics(detector, holdout, batch_size=)`: a family trained by the prompt-training loop
  (`ModelFamily.promotion_metrics`; daemon/learning/retraining_job.py): image and pixel metrics of the detector's
  predictions on the held-out dataset, as one group;
- `reference_holdout_metrics(learning, detector, models, sources, rate=, rules=)`: a family that learns from labels on
  each source's references (`LabelLearning.promotion_metrics`; daemon/learning/head_retraining_job.py): per model
  (the candidate, the active one), each source's held-out frames scored against its own bank, the image and pixel
  metrics, and the operating point: the threshold each model gets from its known-good frames (held-out
  references and their calibration views, plus the training frames labelled normal) at `rate`, the way the daemon
  calibrates a new version, and the held-out defects missed and normals alerted at it. When a source holds out no
  labelled normal, its references' own leave-one-out scores stand in as the normals of the image metrics.

How the daemon brings scores to its 0–1 scale and calibrates a threshold is its own rule (daemon/detectors/scale.py,
daemon/references/calibration.py): the job passes them in (`DaemonRules`), so this module imports nothing of the
daemon.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.datasets import Sample
from model.geometry import Geometry

log = logging.getLogger("anomalyd.promotion")


def holdout_metrics(detector: Any, holdout: Any, *, batch_size: int) -> dict[str, Any]:
    """Image and pixel metrics of `detector` over the held-out dataset (`model.dataset_loading` items), one group;
    `skipped`: the frames that could not be read. RuntimeError when none could."""
    from torch.utils.data import DataLoader

    from model.dataset_loading import collate_samples
    from model.metrics import MetricAccumulator

    accumulator = MetricAccumulator()
    skipped = 0
    seen = 0
    for batch in DataLoader(holdout, batch_size=batch_size, collate_fn=collate_samples):
        for path, message in batch["errors"]:
            log.warning("held-out frame skipped: %s: %s", path, message)
        skipped += len(batch["errors"])
        if batch["image"].shape[0] == 0:
            continue
        with torch.inference_mode():
            prediction = detector.predict(batch["image"], list(batch["category"]))
        maps = prediction.maps.float().cpu().numpy()
        masks = [batch["mask"][i].numpy() if batch["has_mask"][i] else None for i in range(maps.shape[0])]
        accumulator.add("holdout", batch["label"].numpy(), prediction.scores.float().cpu().numpy(), maps=maps,
                        masks=masks)
        seen += maps.shape[0]
    if not seen:
        raise RuntimeError("no held-out frame could be read")
    metrics = dict(accumulator.compute_category("holdout"))
    metrics["skipped"] = skipped
    return metrics


# --- families that learn from labels on each source's references ---------------------------------------------------

# (detector, raw image scores, raw maps) → (scores, maps) on the daemon's 0–1 scale
ScaleRule = Callable[[Any, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# (detector, known-good scores, their map maxima, false-reject rate, what) → (image, pixel) thresholds
ThresholdRule = Callable[[Any, Sequence[float], Sequence[float], float, str], tuple[float, float]]


@dataclass(frozen=True)
class DaemonRules:
    """The daemon's score scale and threshold calibration, as the retraining job hands them in."""

    scale: ScaleRule
    threshold: ThresholdRule


@dataclass
class SourceHoldout:
    """One source's part of the evaluation: its references (its bank), held-out labelled frames, the training
    frames labelled normal (known-good for the threshold) and the geometry the daemon runs it with."""

    references: list[Path]
    holdout: list[Sample]
    train_normals: list[Path] = field(default_factory=list)
    geometry: Geometry = field(default_factory=Geometry)


def images(paths: Sequence[str | Path], size: int) -> torch.Tensor:
    from model.dataset_loading import load_image

    return torch.stack([load_image(Path(p), size, "fast") for p in paths]) if paths else \
        torch.zeros(0, 3, size, size)


def _scores(detector: Any, paths: Sequence[str | Path], size: int, scale: ScaleRule) -> tuple[list, list]:
    """(image scores, maps) on the daemon's scale; with a geometry, scored through it as the daemon scores the
    source's frames (maps in each frame's own pixels)."""
    if not paths:
        return [], []
    geometry = getattr(detector, "geometry", None)
    if geometry is not None and not geometry.plain:
        from model.geometry import predict_frames
        from model.preprocess import decode_image

        raw_scores, raw_maps = predict_frames(detector, [decode_image(p) for p in paths], geometry,
                                              batch_size=int(getattr(detector, "batch_size", 8)))
        scores = scale(detector, torch.as_tensor(raw_scores).float(), torch.zeros(len(paths), 1, 1))[0]
        maps = [scale(detector, torch.zeros(1), torch.as_tensor(m).float()[None])[1][0].numpy() for m in raw_maps]
        return scores.tolist(), maps
    with torch.inference_mode():
        prediction = detector.predict(images(paths, size))
    scores, maps = scale(detector, prediction.scores.float().cpu(), prediction.maps.float().cpu())
    return scores.tolist(), [m.numpy() for m in maps]


def _square(maps: list[Any], size: int) -> list[Any]:
    """Maps in frame pixels at the model size (the held-out metrics compare them with square masks)."""
    import cv2

    return [m if m.shape == (size, size) else cv2.resize(m, (size, size), interpolation=cv2.INTER_LINEAR)
            for m in maps]


def _evaluate_source(scorer: Any, source: str, part: SourceHoldout, rate: float, rules: DaemonRules
                     ) -> dict[str, Any]:
    """One model (`scorer`) on one source's held-out frames: scores, maps, its calibrated threshold and the
    known-good own scores (the stand-in normals), as the daemon computes them for that model's family."""
    from model.factory import known_good_of
    from model.known_good import CALIBRATION_HOLDOUTS

    size = scorer.image_size
    known = known_good_of(scorer)(scorer, part.references, CALIBRATION_HOLDOUTS)
    scorer.distance_scale = known.distance_scale  # as the daemon sets it on a source's detector
    good, good_max = rules.scale(scorer, torch.tensor(known.scores), torch.tensor(known.maxima))
    own = rules.scale(scorer, torch.tensor(known.own), torch.tensor(known.own))[0].tolist()
    normal_scores, normal_maps = _scores(scorer, part.train_normals, size, rules.scale)
    good_scores = good.tolist() + normal_scores
    good_maxima = good_max.tolist() + [float(m.max()) for m in normal_maps]
    image, pixel = rules.threshold(scorer, good_scores, good_maxima, rate, f"source {source} ({scorer.name})")
    scores, maps = _scores(scorer, [s.path for s in part.holdout], size, rules.scale)
    return {"threshold": image, "pixel_threshold": pixel, "scores": scores, "maps": maps, "own": own,
            "known_good": len(good_scores)}


def reference_holdout_metrics(learning: Any, detector: Any, models: Mapping[str, Any],
                              sources: Mapping[str, SourceHoldout], *, rate: float, rules: DaemonRules,
                              on_evaluated: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Per model name (`models`: name → the family's weights, None for the base model the labels improve on):
    {"metrics": held-out image/pixel metrics plus missed and false_alarms, "operating_point": the counts and each
    source's threshold} (see the module docstring). `detector`: the family's, built with `references_later=True`;
    `learning`: its `LabelLearning`."""
    from model.dataset_loading import load_mask
    from model.metrics import MetricAccumulator

    results: dict[str, Any] = {}
    for name, weights in models.items():
        accumulator = MetricAccumulator()
        point: dict[str, Any] = {"missed": 0, "defects": 0, "false_alarms": 0, "normals": 0, "thresholds": {},
                                 "normals_from_references": 0}
        for source, part in sorted(sources.items()):
            detector.geometry = part.geometry
            if part.geometry.plain:
                detector.set_references(images(part.references, detector.image_size))
            else:
                detector.load_references([str(p) for p in part.references])
            out = _evaluate_source(learning.scorer(detector, weights), source, part, rate, rules)
            labels = [int(s.label) for s in part.holdout]
            masks = [load_mask(s, detector.image_size).numpy() if s.label else None for s in part.holdout]
            maps = _square(out["maps"], detector.image_size)
            scores = list(out["scores"])
            if not any(label == 0 for label in labels):  # no held-out labelled normal: the references stand in
                labels += [0] * len(out["own"])
                scores += out["own"]
                maps = maps + [np.zeros_like(maps[0]) for _ in out["own"]]
                masks += [None] * len(out["own"])
                point["normals_from_references"] += len(out["own"])
            accumulator.add("holdout", np.asarray(labels), np.asarray(scores, dtype=np.float64),
                            maps=np.stack(maps), masks=masks)
            threshold = out["threshold"]
            point["thresholds"][source] = threshold
            for sample, score in zip(part.holdout, out["scores"], strict=True):
                if sample.label:
                    point["defects"] += 1
                    point["missed"] += int(score < threshold)  # alert = score >= threshold, as the daemon alerts
                else:
                    point["normals"] += 1
                    point["false_alarms"] += int(score >= threshold)
        metrics = dict(accumulator.compute_category("holdout"))
        metrics.update({"missed": point["missed"], "false_alarms": point["false_alarms"]})
        results[name] = {"metrics": metrics, "operating_point": point}
        if on_evaluated is not None:
            on_evaluated(name)
    return results
