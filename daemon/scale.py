"""The daemon's score scale: every model's image score and anomaly map brought to 0–1 before thresholds apply.

The model code keeps each family's raw outputs (the golden parity tests and `anomalyd predict` reproduce the
official numbers); the daemon wraps the detector it runs in `ScaledDetector`, which applies the family's
declared scale, so `threshold`, `pixel_threshold`, regions, masks and heatmap colours mean the same with any taps
or model. Declared ranges (raw → daemon):

| family | raw image score | raw map | daemon map |
|---|---|---|---|
| anomalyclip | 0–1 (softmax) | 0–n_taps (per-tap (p_a + 1 - p_n)/2 summed) | raw / n_taps |
| adaclip, clip, winclip | 0–1 | 0–1 | unchanged |
| patchcore | 0–∞ (distance) | 0–∞ (distance) | 1 - exp(-raw / d0), d0 = the bank's own scale |
| mutual (online) | 0–∞ (distance / window scale) | same | 1 - exp(-raw): the window's exclusion point → 0.5 |

PatchCore's d0 is the detector's `distance_scale` when it declares one (a typical nearest-neighbour distance
between normal patches of its bank), else 1: the result stays monotone in the distance, and the daemon's
calibration (daemon/references.py) puts the thresholds where the target false-reject rate is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

# family → (image score, map) → scaled (image score, map)
ScaleRule = Callable[[Any, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
SCALES: dict[str, ScaleRule] = {}


def register_scale(family: str) -> Callable[[ScaleRule], ScaleRule]:
    def decorator(rule: ScaleRule) -> ScaleRule:
        SCALES[family] = rule
        return rule

    return decorator


def _taps(detector: Any) -> int:
    layers = getattr(getattr(detector, "model", None), "layers", None) or getattr(detector, "layers", None) or (1,)
    return max(1, len(tuple(layers)))


@register_scale("anomalyclip")
def _anomalyclip(detector: Any, scores: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return scores, maps / _taps(detector)


@register_scale("patchcore")
def _patchcore(detector: Any, scores: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = float(getattr(detector, "distance_scale", None) or 1.0)
    return 1.0 - torch.exp(-scores.clamp_min(0) / scale), 1.0 - torch.exp(-maps.clamp_min(0) / scale)


# Mutual scoring (model/mutual): distances like PatchCore's, d0 from the source's window (0.5 = its exclusion point).
SCALES["mutual"] = _patchcore


def scale_outputs(detector: Any, scores: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The family's declared 0–1 scale applied to raw outputs (families without a rule are already 0–1)."""
    rule = SCALES.get(str(getattr(detector, "name", "")))
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
