"""Frame geometry: which pixels of a camera frame a model sees, and how its maps come back to the frame's pixels.

A `Geometry` is a crop (`roi`, frame pixels), polygons never inspected (`ignore`) and a resize mode:
- `squash`: the ROI resized to the model's square (S x S), aspect ratio lost (the historical behaviour);
- `fit`: the aspect ratio kept: the short side goes to S, the long side follows, rounded to the backbone's stride
  (one rectangular input; for models that run on any size, such as PatchCore's CNN);
- `tile`: the ROI at its native resolution (never enlarged: a side below S is padded by reflection, so every
  frame's texture keeps one scale) cut into S x S tiles overlapping by `tile_overlap`; the tiles' maps are
  stitched with a Hann (sin²) window, so a tile's border, where its map is least reliable, weighs least.
  `tile_size` (frame pixels) makes each tile cover that many frame pixels instead of S: the ROI is first scaled
  by S / tile_size, so fewer, coarser tiles (e.g. the short side of a long part: 4 tiles of a 500 x 1263 frame
  instead of 21) trade resolution for speed.
- `auto`: per frame, what suits its shape: `tile` with tiles of the ROI's short side (`tile_size`, when set, instead)
  for a long ROI (long side at least AUTO_MIN_ASPECT times the short one and at least 2 S, where squashing would
  shrink the long side several times more than the short one and a thin defect along it vanishes), `squash` for
  every other. A camera's frames share one shape, so a source's references and frames are treated alike.

`plan_frame` says where each model input comes from, `cut_frame` makes the inputs (RGB uint8), `stitch_maps`
puts their maps back into a (H, W) map of the frame: zero outside the ROI and on ignored pixels. `predict_frames`
runs any detector (`predict(images) -> scores, maps`) on frames of any size this way, batching the inputs of
equal shape of all frames together. Pure NumPy/OpenCV/PyTorch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # NumPy loads on first use: reading the configuration (Geometry) needs none of it
    import numpy as np

RESIZE_MODES = ("squash", "fit", "tile", "auto")
# The daemon's and the command line's resize when none is set, for the models that run on any frame shape
# (PatchCore): the best on the shared samples, no category worse (docs/models.md, "Frame geometry").
DEFAULT_RESIZE = "squash"
DEFAULT_TILE_OVERLAP = 0.25
DEFAULT_STRIDE = 32
# The long side of a `fit` input is capped at this many times S (a 20:1 line-scan frame would otherwise make one
# input of 20 S²): beyond it the input is squashed along the long side, which keeps memory bounded.
MAX_FIT_ASPECT = 8
# The tiles of one frame at most (a 100 MP frame at S = 256 would be ~2000 tiles): beyond it the frame is scaled
# down before tiling, so the cost per frame stays bounded whatever the camera.
MAX_TILES = 256
# The model inputs cut and held at once by `predict_frames` (two frames of MAX_TILES tiles): with MAX_TILES this
# bounds the tiles in memory (~100 MB of uint8 inputs, ~130 MB of their maps at S = 256) whatever the batch of frames.
MAX_PENDING_INPUTS = 2 * MAX_TILES
MIN_TILE_SIZE, MAX_TILE_SIZE = 32, 16384  # `tile_size` bounds, frame pixels
# `auto` tiles a ROI whose long side is at least this many times its short side, and at least 2 S: the issue's
# 500 x 1263 part (2.5:1) gained 0.83 -> 0.94 image AUROC from tiles of its short side; a long frame under 2 S has
# little resolution to lose to squashing.
AUTO_MIN_ASPECT = 2.0

Polygon = tuple[tuple[float, float], ...]


class GeometryError(ValueError):
    """A geometry that cannot be applied: unknown mode, an ROI outside the frame, a polygon of < 3 points."""


@dataclass(frozen=True)
class Geometry:
    """What part of a frame is inspected and how it is fed to the model (see the module docstring)."""

    resize: str = "squash"
    roi: tuple[int, int, int, int] | None = None  # x, y, width, height in frame pixels
    ignore: tuple[Polygon, ...] = ()  # polygons [(x, y), ...] in frame pixels
    tile_overlap: float = DEFAULT_TILE_OVERLAP
    tile_size: int | None = None  # frame pixels per tile side; None: the model's input size (native resolution)

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise GeometryError(f"resize {self.resize!r} is not one of {', '.join(RESIZE_MODES)}")
        if self.roi is not None:
            roi = tuple(int(v) for v in self.roi)
            if len(roi) != 4 or roi[0] < 0 or roi[1] < 0 or roi[2] < 8 or roi[3] < 8:
                raise GeometryError(f"roi {list(self.roi)}: expected [x, y, width, height] with x, y >= 0 and "
                                    "a width and height of at least 8 pixels")
            object.__setattr__(self, "roi", roi)
        polygons = []
        for polygon in self.ignore:
            points = tuple((float(p[0]), float(p[1])) for p in polygon)
            if len(points) < 3:
                raise GeometryError(f"ignore polygon {list(polygon)}: needs at least 3 points [x, y]")
            polygons.append(points)
        object.__setattr__(self, "ignore", tuple(polygons))
        if not 0.0 <= float(self.tile_overlap) < 0.9:
            raise GeometryError(f"tile_overlap {self.tile_overlap}: expected a fraction in [0, 0.9)")
        if self.tile_size is not None:
            if not MIN_TILE_SIZE <= int(self.tile_size) <= MAX_TILE_SIZE:
                raise GeometryError(f"tile_size {self.tile_size}: expected frame pixels from {MIN_TILE_SIZE} to "
                                    f"{MAX_TILE_SIZE}")
            object.__setattr__(self, "tile_size", int(self.tile_size))

    @property
    def plain(self) -> bool:
        """Today's behaviour: the whole frame squashed, nothing ignored."""
        return self.resize == "squash" and self.roi is None and not self.ignore

    @property
    def may_tile(self) -> bool:
        """Whether frames may be cut into tiles ("tile", or "auto" on a long frame): a model trained on one input per
        frame (a head on frame labels) cannot run it."""
        return self.resize in ("tile", "auto")

    @property
    def bank_tag(self) -> str:
        """What changes the memory bank's rows (mode, overlap, ROI); '' for plain squash."""
        if self.resize == "squash" and self.roi is None:
            return ""
        tag = self.resize
        if self.may_tile:
            tag += f"-o{round(self.tile_overlap * 100)}" + (f"-t{self.tile_size}" if self.tile_size else "")
        if self.roi is not None:
            tag += "-roi" + "x".join(str(v) for v in self.roi)
        return tag

    @property
    def tag(self) -> str:
        """The bank tag plus a digest of the ignore polygons (they change the scores, not the bank)."""
        tag = self.bank_tag
        if self.ignore:
            digest = hashlib.sha256(json.dumps(self.ignore).encode()).hexdigest()[:8]
            tag = (tag or "squash") + f"-ign{digest}"
        return tag

    def as_dict(self) -> dict[str, Any]:
        values = {"resize": self.resize, "roi": list(self.roi) if self.roi else None,
                  "ignore": [[list(p) for p in polygon] for polygon in self.ignore], "tile_overlap": self.tile_overlap}
        if self.tile_size is not None:  # only when set: a geometry recorded before the key existed stays equal
            values["tile_size"] = self.tile_size
        return values


def make_geometry(resize: str | None = None, roi: Sequence[int] | None = None,
                  ignore: Sequence[Sequence[Sequence[float]]] | None = None,
                  tile_overlap: float | None = None, tile_size: int | None = None) -> Geometry:
    """A Geometry from loose values (config, CLI); None means the default."""
    return Geometry(resize=resize or "squash", roi=tuple(roi) if roi else None,  # type: ignore[arg-type]
                    ignore=tuple(tuple(tuple(p) for p in polygon) for polygon in (ignore or ())),  # type: ignore
                    tile_overlap=DEFAULT_TILE_OVERLAP if tile_overlap is None else float(tile_overlap),
                    tile_size=None if tile_size is None else int(tile_size))


@dataclass
class FramePlan:
    """Where a frame's model inputs come from: the ROI (x, y, w, h) of the frame, resized to `scaled` (h, w),
    padded (reflected) at the bottom and right to `padded` (tiles of a small frame), cut into inputs of `input_hw`
    at the `origins` (y, x)."""

    frame_hw: tuple[int, int]
    roi: tuple[int, int, int, int]
    scaled: tuple[int, int]
    input_hw: tuple[int, int]
    origins: list[tuple[int, int]] = field(default_factory=list)
    padded: tuple[int, int] | None = None


def auto_geometry(geometry: Geometry, roi_hw: tuple[int, int], size: int) -> Geometry:
    """What `auto` runs on a ROI of (height, width): tiles of its short side (or of `tile_size`) when it is long,
    else squash (see the module docstring)."""
    short, long = sorted((int(roi_hw[0]), int(roi_hw[1])))
    if long >= AUTO_MIN_ASPECT * short and long >= 2 * size:
        return replace(geometry, resize="tile", tile_size=geometry.tile_size or min(MAX_TILE_SIZE, max(MIN_TILE_SIZE, short)))
    return replace(geometry, resize="squash")


def _round_to(value: float, stride: int) -> int:
    return max(stride, round(value / stride) * stride)


def _positions(length: int, size: int, overlap: float) -> list[int]:
    """Tile starts covering [0, length) with tiles of `size` overlapping by at least `overlap`, evenly spread."""
    import numpy as np

    if length <= size:
        return [0]
    step = max(1.0, size * (1.0 - overlap))
    count = int(np.ceil((length - size) / step)) + 1
    return [round(i * (length - size) / (count - 1)) for i in range(count)]


def plan_frame(frame_hw: tuple[int, int], geometry: Geometry, size: int,
               stride: int = DEFAULT_STRIDE) -> FramePlan:
    """The plan of one frame of (height, width) under `geometry` for a model of input size `size`."""
    import numpy as np

    height, width = int(frame_hw[0]), int(frame_hw[1])
    if geometry.roi is None:
        roi = (0, 0, width, height)
    else:
        x, y, w, h = geometry.roi
        if x >= width or y >= height:
            raise GeometryError(f"roi {list(geometry.roi)} starts outside the {width}x{height} frame")
        roi = (x, y, min(w, width - x), min(h, height - y))
    rw, rh = roi[2], roi[3]
    if geometry.resize == "auto":
        geometry = auto_geometry(geometry, (rh, rw), size)
    if geometry.resize == "squash":
        return FramePlan((height, width), roi, (size, size), (size, size), [(0, 0)])
    if geometry.resize == "fit":
        scale = size / min(rw, rh)
        long_cap = MAX_FIT_ASPECT * size
        fh = size if rh <= rw else min(long_cap, _round_to(rh * scale, stride))
        fw = size if rw < rh else min(long_cap, _round_to(rw * scale, stride))
        return FramePlan((height, width), roi, (fh, fw), (fh, fw), [(0, 0)])
    # tile: native resolution (or S / tile_size of it; padded up to S), reduced only when it would make too many tiles
    scale = 1.0 if geometry.tile_size is None else size / geometry.tile_size
    rh, rw = rh * scale, rw * scale
    step = size * (1.0 - geometry.tile_overlap)
    tiles = (max(0.0, rh - size) / step + 1) * (max(0.0, rw - size) / step + 1)
    scale = float(np.sqrt(MAX_TILES / tiles)) if tiles > MAX_TILES else 1.0
    while True:  # the estimate above counts fractional tiles: shrink a little more until whole ones fit too
        sh, sw = max(1, round(rh * scale)), max(1, round(rw * scale))
        ph, pw = max(size, sh), max(size, sw)
        ys, xs = _positions(ph, size, geometry.tile_overlap), _positions(pw, size, geometry.tile_overlap)
        if len(ys) * len(xs) <= MAX_TILES:
            break
        scale *= 0.97
    origins = [(y, x) for y in ys for x in xs]
    return FramePlan((height, width), roi, (sh, sw), (size, size), origins, padded=(ph, pw))


def _resize(rgb: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """OpenCV resize with the daemon's rule (model/preprocess.py fast_resize): area when shrinking 2x or more,
    else bicubic."""
    import cv2

    if rgb.shape[:2] == tuple(hw):
        return rgb
    shrink = max(rgb.shape[0] / hw[0], rgb.shape[1] / hw[1])
    interpolation = cv2.INTER_AREA if shrink >= 2.0 else cv2.INTER_CUBIC
    return cv2.resize(rgb, (hw[1], hw[0]), interpolation=interpolation)


def cut_frame(rgb: np.ndarray, plan: FramePlan) -> list[np.ndarray]:
    """The model inputs (RGB uint8, `plan.input_hw`) of one frame."""
    import numpy as np

    x, y, w, h = plan.roi
    scaled = np.ascontiguousarray(_resize(np.ascontiguousarray(rgb[y:y + h, x:x + w]), plan.scaled))
    if plan.padded is not None and plan.padded != plan.scaled:
        scaled = np.pad(scaled, ((0, plan.padded[0] - plan.scaled[0]), (0, plan.padded[1] - plan.scaled[1]), (0, 0)),
                        mode="symmetric")
    th, tw = plan.input_hw
    return [np.ascontiguousarray(scaled[oy:oy + th, ox:ox + tw]) for oy, ox in plan.origins]


def blend_window(height: int, width: int) -> np.ndarray:
    """A 2-D Hann (sin²) weight, never zero (so a pixel covered by one tile keeps its value)."""
    import numpy as np

    wy = np.sin(np.pi * (np.arange(height) + 0.5) / height) ** 2
    wx = np.sin(np.pi * (np.arange(width) + 0.5) / width) ** 2
    return (np.outer(wy, wx) + 1e-3).astype(np.float32)


def ignore_mask(frame_hw: tuple[int, int], polygons: Sequence[Polygon]) -> np.ndarray | None:
    """Bool (H, W) of the ignored pixels, or None without polygons."""
    import numpy as np

    if not polygons:
        return None
    import cv2

    mask = np.zeros(frame_hw, np.uint8)
    cv2.fillPoly(mask, [np.round(np.asarray(p, np.float64)).astype(np.int32) for p in polygons], 1)
    return mask.astype(bool)


def stitch_maps(maps: Sequence[np.ndarray], plan: FramePlan, geometry: Geometry) -> np.ndarray:
    """The inputs' maps → one float32 (H, W) map of the frame: blended over overlaps, resized to the ROI, zero
    outside it and on ignored pixels."""
    import cv2
    import numpy as np

    if len(maps) == 1 and len(plan.origins) == 1:
        scaled = np.asarray(maps[0], np.float32)
    else:
        total = np.zeros(plan.padded or plan.scaled, np.float32)
        weight = np.zeros(plan.padded or plan.scaled, np.float32)
        window = blend_window(*plan.input_hw)
        th, tw = plan.input_hw
        for (oy, ox), tile_map in zip(plan.origins, maps, strict=True):
            total[oy:oy + th, ox:ox + tw] += np.asarray(tile_map, np.float32) * window
            weight[oy:oy + th, ox:ox + tw] += window
        scaled = total / np.maximum(weight, 1e-12)
    scaled = scaled[:plan.scaled[0], :plan.scaled[1]]  # the reflected padding of a small frame dropped
    x, y, w, h = plan.roi
    roi_map = scaled if scaled.shape == (h, w) else cv2.resize(scaled, (w, h), interpolation=cv2.INTER_LINEAR)
    if plan.roi == (0, 0, plan.frame_hw[1], plan.frame_hw[0]):
        frame_map = np.ascontiguousarray(roi_map, np.float32)
    else:
        frame_map = np.zeros(plan.frame_hw, np.float32)
        frame_map[y:y + h, x:x + w] = roi_map
    mask = ignore_mask(plan.frame_hw, geometry.ignore)
    if mask is not None:
        frame_map[mask] = 0.0
    return frame_map


def normalised_inputs(pixels: Sequence[np.ndarray]) -> Any:
    """RGB uint8 inputs of one shape → (N, 3, h, w) float32, normalised as the models' inputs are."""
    import numpy as np
    import torch

    from model.preprocess import normalise_pixels

    return normalise_pixels(torch.from_numpy(np.stack(pixels)))


def frame_inputs(rgb: np.ndarray, geometry: Geometry, size: int, stride: int = DEFAULT_STRIDE) -> Any:
    """One frame's model inputs as a normalised (N, 3, h, w) tensor (references, calibration)."""
    return normalised_inputs(cut_frame(rgb, plan_frame(rgb.shape[:2], geometry, size, stride)))


def input_groups(plans: Sequence[FramePlan], max_inputs: int) -> list[range]:
    """Consecutive frames whose inputs together stay within `max_inputs` (a frame with more is a group alone): the
    frames of one group are cut, batched and stitched before the next group is cut."""
    groups, start, pending = [], 0, 0
    for index, plan in enumerate(plans):
        count = len(plan.origins)
        if index > start and pending + count > max_inputs:
            groups.append(range(start, index))
            start, pending = index, 0
        pending += count
    if start < len(plans):
        groups.append(range(start, len(plans)))
    return groups


def predict_frames(detector: Any, frames: Sequence[np.ndarray], geometry: Geometry, *, size: int | None = None,
                   stride: int = DEFAULT_STRIDE, batch_size: int = 8, max_inputs: int = MAX_PENDING_INPUTS,
                   class_names: Sequence[str] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """(image scores (B,), maps [(H, W) of each frame]) of RGB frames of any size under `geometry`.

    The inputs of consecutive frames, up to `max_inputs` of them at a time (`input_groups`), are batched by shape,
    `batch_size` inputs per model call: memory stays bounded however many frames of however many tiles come in.
    A frame's score is the detector's image score when the frame is one input and nothing is ignored; else (tiles,
    ignore polygons) the maximum of its stitched map, so an ignored pixel never raises it.
    """
    import numpy as np

    size = int(size or detector.image_size)
    plans = [plan_frame(rgb.shape[:2], geometry, size, stride) for rgb in frames]
    frame_scores = np.zeros(len(frames), np.float32)
    frame_maps: list[np.ndarray] = []
    for group in input_groups(plans, max_inputs):
        scores, maps = _predict_inputs(detector, [(i, frames[i], plans[i]) for i in group], batch_size, class_names)
        position = 0
        for index in group:
            plan = plans[index]
            count = len(plan.origins)
            frame_map = stitch_maps(maps[position:position + count], plan, geometry)
            single = count == 1 and not geometry.ignore
            frame_scores[index] = scores[position] if single else float(frame_map.max())
            frame_maps.append(frame_map)
            position += count
    return frame_scores, frame_maps


def _predict_inputs(detector: Any, frames: Sequence[tuple[int, np.ndarray, FramePlan]], batch_size: int,
                    class_names: Sequence[str] | None) -> tuple[np.ndarray, list[np.ndarray]]:
    """(scores, maps) of every model input of `frames` ((index, rgb, plan)), in frame then input order; the inputs
    of equal shape are batched together whichever frame they come from."""
    import numpy as np
    import torch

    inputs = [(index, tile) for index, rgb, plan in frames for tile in cut_frame(rgb, plan)]
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for position, (_, tile) in enumerate(inputs):
        by_shape.setdefault(tile.shape, []).append(position)
    scores = np.zeros(len(inputs), np.float32)
    maps: list[Any] = [None] * len(inputs)
    for positions in by_shape.values():
        for start in range(0, len(positions), batch_size):
            chunk = positions[start:start + batch_size]
            images = normalised_inputs([inputs[p][1] for p in chunk])
            names = [class_names[inputs[p][0]] for p in chunk] if class_names else None
            with torch.inference_mode():
                prediction = detector.predict(images, names)
            chunk_scores = prediction.scores.detach().float().cpu().numpy().reshape(-1)
            chunk_maps = prediction.maps.detach().float().cpu().numpy()
            for offset, p in enumerate(chunk):
                scores[p], maps[p] = chunk_scores[offset], chunk_maps[offset]
    return scores, maps
