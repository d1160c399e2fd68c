"""The daemon's score scale: every model's image score and anomaly map brought to 0–1 before thresholds apply.

The model code keeps each family's raw outputs (the golden parity tests and `anomalyd predict` reproduce the
official numbers); the daemon wraps the detector it runs in `ScaledDetector`, which applies the scale the family
declares (`Capabilities.score_scale`, model/factory.py), so `threshold`, `pixel_threshold`, regions, masks and heatmap
colours mean the same with any taps or model. The declared kinds (raw → daemon):

| score_scale | raw image score | raw map | daemon map | families today |
|---|---|---|---|---|
| unit | 0–1 | 0–1 | unchanged | adaclip, clip, clip-ac, winclip, patchcore-head |
| per_tap | 0–1 (softmax) | 0–n_taps (per-tap (p_a + 1 - p_n)/2 summed) | raw / n_taps | anomalyclip |
| distance | 0–∞ (distance) | 0–∞ (distance) | 1 - exp(-raw / d0) | patchcore; mutual (d0: its window's scale) |

d0 is the detector's `distance_scale` when it declares one (PatchCore: a typical nearest-neighbour distance between
normal patches of its bank; mutual scoring: its window's exclusion point, which lands on 0.5), else 1: the result
stays monotone in the distance, and the daemon's calibration (daemon/references/manager.py) puts the thresholds where the
target false-reject rate is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from model.factory import ScoreScale, capabilities_of

# (detector, image score, map) → scaled (image score, map), per declared score_scale kind
ScaleRule = Callable[[Any, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _taps(detector: Any) -> int:
    layers = getattr(getattr(detector, "model", None), "layers", None) or getattr(detector, "layers", None) or (1,)
    return max(1, len(tuple(layers)))


def _per_tap(detector: Any, scores: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return scores, maps / _taps(detector)


def _distance(detector: Any, scores: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = float(getattr(detector, "distance_scale", None) or 1.0)
    return 1.0 - torch.exp(-scores.clamp_min(0) / scale), 1.0 - torch.exp(-maps.clamp_min(0) / scale)


SCALES: dict[ScoreScale, ScaleRule] = {"per_tap": _per_tap, "distance": _distance}  # "unit": unchanged


def scale_outputs(detector: Any, scores: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The family's declared 0–1 scale applied to raw outputs ("unit", and detectors of no family: unchanged)."""
    rule = SCALES.get(capabilities_of(detector).score_scale)
    return rule(detector, scores, maps) if rule is not None else (scores, maps)


class ScaledDetector:
    """A detector whose outputs are on the daemon's 0–1 scale; every other attribute is the wrapped one's."""

    def __init__(self, base: Any) -> None:
        self.__dict__["base"] = base

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["base"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__dict__["base"], name, value)

    def predict(self, images: torch.Tensor, class_names: Sequence[str] | None = None) -> Any:
        prediction = self.base.predict(images, class_names)
        scores, maps = scale_outputs(self.base, prediction.scores, prediction.maps)
        notes = getattr(prediction, "notes", None)  # per-frame notes (mutual scoring's drift watch) pass through
        return type(prediction)(scores=scores, maps=maps, **({"notes": notes} if notes is not None else {}))


def scaled(detector: Any) -> Any:
    """`detector` on the daemon's scale (idempotent)."""
    return detector if isinstance(detector, ScaledDetector) or getattr(detector, "scaled", False) else \
        ScaledDetector(detector)
