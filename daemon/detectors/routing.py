"""The detector the model worker runs when sources have references of their own: `RoutedDetector` sends each
frame of a batch to its source's detector (daemon/references/manager.py builds them) and answers on the daemon's 0–1
scale (daemon/detectors/scale.py); a source with a fit/tile/ROI geometry is scored from its frames (daemon/config/geometry.py). A
source's reference detector (PatchCore) adds its drift watch's per-frame notes (daemon/detectors/drift_watch.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from daemon.detectors.drift_watch import with_drift_notes
from daemon.detectors.scale import scaled


class RoutedDetector:
    """The base detector plus one detector per source with references; `predict_routed` sends each frame to its
    source's detector (the model worker calls it), `predict` runs the base. Outputs on the daemon's 0–1 scale."""

    def __init__(self, base: Any, per_source: dict[str, Any]) -> None:
        self.raw = base
        self.base = scaled(base)
        self.per_source = dict(per_source)
        self.name = getattr(base, "name", "unknown")
        self.version = getattr(base, "version", "unknown")
        self.image_size = int(base.image_size)
        self.device = getattr(base, "device", "cpu")

    def __getattr__(self, name: str) -> Any:  # model, backbone, ... of the base (the model watcher shares them)
        if name in ("raw", "base", "per_source"):
            raise AttributeError(name)
        return getattr(self.raw, name)

    def predict(self, images: Any, class_names: Sequence[str] | None = None) -> Any:
        return self.base.predict(images, class_names)

    def version_for(self, source_id: str) -> str:
        detector = self.per_source.get(source_id)
        return str(getattr(detector if detector is not None else self.base, "version", self.version))

    def predict_routed(self, images: Any, class_names: Sequence[str] | None,
                       source_ids: Sequence[str], frames: Sequence[Any] | None = None) -> tuple[Any, list[str]]:
        """`frames` (the RGB frames at their own size): a source whose detector has a fit/tile/ROI geometry is
        scored from them (daemon/config/geometry.py), its maps in the frame's pixels (`maps` is then a list)."""
        import torch

        groups: dict[int, tuple[Any, list[int]]] = {}
        for index, source_id in enumerate(source_ids):
            detector = self.per_source.get(source_id, self.base)
            groups.setdefault(id(detector), (detector, []))[1].append(index)
        versions = [self.version_for(source_id) for source_id in source_ids]
        if frames is not None and any(not getattr(getattr(d, "geometry", None), "plain", True)
                                      for d, _ in groups.values()):
            from daemon.config.geometry import predict_routed_frames

            return predict_routed_frames(list(groups.values()), images, class_names, frames), versions
        watched = {id(d) for d in self.per_source.values()}  # a source's own detector: its drift watch

        def predict(detector: Any, batch: Any, names: Sequence[str] | None) -> Any:
            prediction = detector.predict(batch, names)
            return with_drift_notes(detector, prediction) if id(detector) in watched else prediction

        if len(groups) == 1:
            detector = next(iter(groups.values()))[0]
            return predict(detector, images, class_names), versions
        scores = torch.empty(len(source_ids), dtype=torch.float32)
        maps: torch.Tensor | None = None
        prediction: Any = None
        notes: list[Any] = [None] * len(source_ids)  # per-frame notes (the drift watches)
        for detector, indices in groups.values():
            names = [class_names[i] for i in indices] if class_names else None
            prediction = predict(detector, images[indices], names)
            if maps is None:
                maps = torch.empty((len(source_ids), *prediction.maps.shape[1:]), dtype=torch.float32)
            index = torch.tensor(indices)
            scores[index] = prediction.scores.detach().float().cpu()
            maps[index] = prediction.maps.detach().float().cpu()
            for offset, note in enumerate(getattr(prediction, "notes", None) or ()):
                notes[indices[offset]] = note
        extra = {"notes": notes} if any(note is not None for note in notes) else {}
        return type(prediction)(scores=scores, maps=maps, **extra), versions
