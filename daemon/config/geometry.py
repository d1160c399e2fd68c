"""Per-source frame geometry in the daemon: `[model]` resize/roi/ignore_polygons/tile_overlap as the default, each
`[[sources]]` entry's own values over it (model/geometry.py does the work).

Only a family that declares `supports_geometry` (model/factory.py: `Capabilities`; PatchCore) runs on rectangles and
builds its bank through the geometry; the others (the CLIP families) keep "squash" with no ROI or ignore polygons,
and any other value for them is a configuration error naming the key.
The calibration of a source with a geometry scores its known-good frames through the same geometry (PatchCore's
`geometry_known_good`, model/patchcore/known_good.py), so thresholds mean what the live frames' scores mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model.factory import capabilities, models_that
from model.geometry import (
    DEFAULT_RESIZE,
    Geometry,
    GeometryError,
    make_geometry,
    predict_frames,
)


def supports_geometry(model_name: str) -> bool:
    """Whether the model runs on any frame shape (its declared capability; False for a name no family has)."""
    try:
        return capabilities(model_name).supports_geometry
    except ValueError:
        return False


def default_resize(model_name: str, engine: str = "torch") -> str:
    """`resize` when none is set: the measured default for the models that run on any frame shape (in PyTorch),
    "squash" for the others (the CLIP families, exported square graphs)."""
    return DEFAULT_RESIZE if supports_geometry(model_name) and engine == "torch" else "squash"


def source_geometry(settings: Any, source_id: str | None) -> Geometry:
    """The geometry of `source_id` (its [[sources]] values over [model]'s); [model]'s for an unknown source."""
    values = {key: value for key, (value, _) in configured_values(settings, source_id).items()}
    return make_geometry(values["resize"], values["roi"], values["ignore_polygons"], values["tile_overlap"],
                         values["tile_size"])


GEOMETRY_KEYS = ("resize", "roi", "ignore_polygons", "tile_overlap", "tile_size")


def configured_values(settings: Any, source_id: str | None) -> dict[str, tuple[Any, str]]:
    """Each geometry key of `source_id` as the configuration sets it, with where it comes from: the source's
    `[[sources]]` entry, `[model]`, or the default."""
    m = settings.model
    values: dict[str, tuple[Any, str]] = {
        "resize": (m.resize, "[model]") if m.resize else
        (default_resize(m.name, str(getattr(settings.runtime, "engine", "torch"))), "default"),
        "roi": (m.roi, "[model]" if m.roi is not None else "default"),
        "ignore_polygons": (m.ignore_polygons, "[model]" if m.ignore_polygons else "default"),
        "tile_overlap": (m.tile_overlap, "[model]" if "tile_overlap" in m.model_fields_set else "default"),
        "tile_size": (m.tile_size, "[model]" if m.tile_size is not None else "default")}
    for source in settings.sources:
        if source.id == source_id:
            for key in GEOMETRY_KEYS:
                own = getattr(source, key, None)
                if own is not None:
                    values[key] = (own, f"[[sources]] {source_id}")
    return values


def check_geometries(settings: Any) -> None:
    """ValueError naming the entry whose geometry cannot be applied (bad values, or a model without support)."""
    entries = [("[model]", None)] + [(f"[[sources]] {s.id}", s.id) for s in settings.sources]
    for where, source_id in entries:
        try:
            geometry = source_geometry(settings, source_id)
        except GeometryError as exc:
            raise ValueError(f"{where}: {exc}") from None
        why = unsupported(settings, geometry)
        if why is not None:
            raise ValueError(f"{where}: {why}")


def unsupported(settings: Any, geometry: Geometry) -> str | None:
    """Why the model and engine of `settings` cannot run `geometry` (None when they can): only a family that
    declares `supports_geometry`, on the torch engine, runs anything but whole frames squashed."""
    if geometry.plain:
        return None
    if not supports_geometry(settings.model.name):
        able = models_that(lambda c: c.supports_geometry)
        return (f"resize {geometry.resize!r}, roi and ignore_polygons need model {' or '.join(able)}; "
                f"model {settings.model.name!r} takes whole frames squashed (resize = \"squash\", no roi/ignore_polygons)")
    engine = str(getattr(settings.runtime, "engine", "torch"))
    if engine != "torch":
        return (f"resize {geometry.resize!r}, roi and ignore_polygons need [runtime].engine = "
                f"\"torch\" (engine {engine!r} runs a fixed square export)")
    return None


def score_frames(detector: Any, files: Sequence[Path], geometry: Geometry) -> tuple[list[float], list[float]]:
    """(image scores, map maxima) of image files through `geometry` (the daemon's scale when `detector` is)."""
    from model.preprocess import decode_image

    scores: list[float] = []
    maxima: list[float] = []
    for start in range(0, len(files), 8):
        frame_scores, maps = predict_frames(detector, [decode_image(f) for f in files[start:start + 8]], geometry)
        scores += [float(s) for s in frame_scores]
        maxima += [float(m.max()) for m in maps]
    return scores, maxima


class FramePredictions:
    """Scores (B,) and each frame's own map: what `RoutedDetector.predict_routed` returns when a source of the
    batch has a geometry (the maps differ in size, so they are a list, not one tensor)."""

    def __init__(self, scores: Any, maps: list[Any]) -> None:
        self.scores = scores
        self.maps = maps


def predict_routed_frames(groups: Sequence[tuple[Any, list[int]]], images: Any, class_names: Sequence[str] | None,
                          frames: Sequence[Any]) -> FramePredictions:
    """The batch scored per detector group: through the geometry from the frames (maps in frame pixels) for the
    detectors that have one, on the square `images` for the others (maps in model space, the writer resizes)."""
    import torch

    scores = torch.empty(len(frames), dtype=torch.float32)
    maps: list[Any] = [None] * len(frames)
    for detector, indices in groups:
        names = [class_names[i] for i in indices] if class_names else None
        geometry = getattr(detector, "geometry", None)
        if geometry is not None and not geometry.plain:
            frame_scores, frame_maps = predict_frames(detector, [frames[i] for i in indices], geometry,
                                                      batch_size=int(getattr(detector, "batch_size", 8)),
                                                      class_names=names)
            for offset, index in enumerate(indices):
                scores[index], maps[index] = float(frame_scores[offset]), frame_maps[offset]
            continue
        prediction = detector.predict(images[indices], names)
        group_scores = prediction.scores.detach().float().cpu().reshape(-1)
        group_maps = prediction.maps.detach().float().cpu().numpy()
        for offset, index in enumerate(indices):
            scores[index], maps[index] = group_scores[offset], group_maps[offset]
    return FramePredictions(scores, maps)
