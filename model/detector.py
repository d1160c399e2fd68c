"""The detector contract: what every model family hands the rest of anomalyd.

A detector takes a batch of preprocessed images (B, 3, S, S) and returns a `Prediction`: one float32 anomaly score
per image and one float32 anomaly map per image in model input space. `TorchDetector` is the one base for the
families that wrap an `nn.Module`: device placement, inference dtype (autocast) and the fixed float32 output.

Adding a model family (see `model.registry` for the registration itself):
1. write the `nn.Module` with a `predict(images, class_names) -> (scores, maps)`;
2. subclass `TorchDetector` (override `_predict` when the module needs more than the images);
3. register a `ModelFamily` whose `create` builds that detector from the `create_detector` options.
This module imports no family, so families (and `model.fewshot`) can import it freely.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Prediction:
    scores: torch.Tensor  # (B,) float32 image anomaly scores
    maps: torch.Tensor  # (B, S, S) float32 anomaly maps in model input space
    # Per image, what a stateful detector knows beyond its score (mutual scoring: its drift watch); None: nothing.
    # A NaN score means no decision (e.g. mutual scoring's window is still filling): never a pass.
    notes: list[dict[str, Any]] | None = None


@runtime_checkable
class Detector(Protocol):
    name: str
    version: str
    image_size: int
    device: torch.device

    def predict(self, images: torch.Tensor, class_names: Sequence[str] | None = None) -> Prediction: ...


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device {device!r} is not valid: expected auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    return resolved


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on the device's type; nothing to do for float32 (or None)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return torch.autocast(device_type, dtype=dtype)


def file_digest(path: str | Path, length: int = 12) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


class TorchDetector:
    """An `nn.Module` behind the Detector protocol: moved to the device in eval mode, run under autocast for
    bfloat16/float16, outputs returned as float32. Subclasses set `name` and may override `_predict`."""

    name: str = "model"

    def __init__(self, model: nn.Module, *, device: torch.device, dtype: torch.dtype, version: str) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.dtype = dtype
        self.version = version
        self.image_size = model.image_size

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.dtype)

    def _predict(self, images: torch.Tensor, class_names: Sequence[str] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, maps) of the module for images already on the device, inside autocast."""
        return self.model.predict(images)

    def _before_autocast(self, images: torch.Tensor, class_names: Sequence[str] | None) -> Sequence[str] | None:
        """Hook run before autocast (e.g. float32 text features, class-name checks); returns the class names."""
        return class_names

    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_names: Sequence[str] | None = None) -> Prediction:
        names = self._before_autocast(images, class_names)
        images = images.to(self.device, non_blocking=True)
        with self._autocast():
            scores, maps = self._predict(images, names)
        return Prediction(scores=scores.float(), maps=maps.float())
