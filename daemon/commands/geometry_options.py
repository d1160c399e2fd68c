"""The frame-geometry options of `anomalyd predict` and `eval` (--resize, --roi, --ignore-polygon, --tile-overlap:
the [model] / [[sources]] keys resize, roi, ignore_polygons, tile_overlap of the daemon), and `eval`'s scoring of
images through a geometry, with maps and masks in each image's own pixels (model/geometry.py)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from typing import Any

from daemon.cli import UsageError


def add_geometry_options(parser: argparse.ArgumentParser) -> None:
    from model.factory import models_that
    from model.geometry import RESIZE_MODES

    able = ", ".join(models_that(lambda caps: caps.supports_geometry))  # read without loading the families
    geometry = parser.add_argument_group(f"frame geometry ({able}; as [model] / [[sources]] resize, roi, "
                                         "ignore_polygons, tile_overlap, tile_size)")
    geometry.add_argument("--resize", choices=RESIZE_MODES,
                          help="squash to the square input (default), fit (aspect kept, short side to the input "
                          "size), tile (native resolution, overlapping tiles) or auto (tiles of the short side for "
                          "long frames, 2:1 and at least twice the input size; squash for the others)")
    geometry.add_argument("--roi", type=parse_roi, help="X,Y,W,H: inspect only this rectangle of each image")
    geometry.add_argument("--ignore-polygon", dest="ignore_polygons", type=parse_polygon, action="append",
                          metavar="X,Y;X,Y;X,Y...", help="pixels never inspected (repeatable)")
    geometry.add_argument("--tile-overlap", type=float, help="fraction of a tile its neighbours overlap (0.25)")
    geometry.add_argument("--tile-size", type=int, help="frame pixels each tile covers (default: the model's input "
                          "size, i.e. native resolution; larger: fewer, coarser tiles)")


def parse_roi(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"{text!r}: expected X,Y,WIDTH,HEIGHT in pixels, e.g. 100,0,1600,600")
    return values


def parse_polygon(text: str) -> list[list[float]]:
    try:
        points = [[float(v) for v in point.split(",")] for point in text.split(";") if point.strip()]
    except ValueError:
        points = []
    if len(points) < 3 or any(len(p) != 2 for p in points):
        raise argparse.ArgumentTypeError(f"{text!r}: expected at least 3 points X,Y;X,Y;X,Y")
    return points


def geometry_option(args: argparse.Namespace, default_resize: str = "squash") -> Any:
    """The --resize/--roi/--ignore-polygon/--tile-overlap geometry (model/geometry.py); `default_resize` without
    --resize (the daemon's default for the model: daemon.config.geometry.default_resize)."""
    from model.geometry import GeometryError, make_geometry

    try:
        return make_geometry(getattr(args, "resize", None) or default_resize, getattr(args, "roi", None),
                             getattr(args, "ignore_polygons", None), getattr(args, "tile_overlap", None),
                             getattr(args, "tile_size", None))
    except GeometryError as exc:
        raise UsageError(str(exc)) from None


def _full_mask(sample: Any, hw: tuple[int, int]) -> Any:
    """The sample's mask at the image's own size (nearest), or None for an anomalous image without one."""
    import numpy as np
    from PIL import Image

    if sample.label == 0 and not sample.mask_path:
        return np.zeros(hw, np.float32)
    if not sample.has_mask or not sample.mask_path:
        return None
    mask = np.asarray(Image.open(sample.mask_path).convert("L"))
    if mask.shape != hw:
        import cv2

        mask = cv2.resize(mask, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)
    return (mask > 0).astype(np.float32)


def score_samples(detector: Any, samples: Sequence[Any], batch_size: int, labels: list, scores: list, maps: list,
                  masks: list, paths: list) -> Iterator[tuple[str, str]]:
    """Score `samples` with `detector.predict_frames` (its geometry), appending to the lists as `eval`'s loop
    does; yields (path, message) for each image that cannot be read."""
    from model.preprocess import ImageDecodeError, decode_image

    for start in range(0, len(samples), batch_size):
        frames, kept = [], []
        for sample in samples[start:start + batch_size]:
            try:
                frames.append(decode_image(sample.path))
            except ImageDecodeError as exc:
                yield str(sample.path), str(exc)
                continue
            kept.append(sample)
        if not frames:
            continue
        frame_scores, frame_maps = detector.predict_frames(frames)
        for sample, score, frame_map in zip(kept, frame_scores, frame_maps, strict=True):
            labels.append(int(sample.label))
            scores.append(float(score))
            maps.append(frame_map)
            masks.append(_full_mask(sample, frame_map.shape))
            paths.append(str(sample.path))
