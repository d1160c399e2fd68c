"""Synthetic anomalies, so that normal-only data can provide positives for prompt training.

Two kinds, both applied to the RGB uint8 image at the model size (the mask then needs no resizing):
- "cutpaste" (CutPaste, Li et al. 2021): a rectangle, a thin "scar" or an irregular blob is cut from the same or
  another normal image, colour-jittered, rotated and pasted elsewhere.
- "noise" (DRAEM-style, Zavrtanik et al. 2021): an irregular region is blended with Perlin-like fractal noise,
  smoothed Gaussian noise, or a texture taken from another image.

The mask marks where the image changed meaningfully: the pasted/blended region where the (slightly smoothed)
per-pixel change reaches `CHANGE_THRESHOLD` grey levels; everywhere outside the mask the output equals the input
exactly. A draw that changes too little (a patch pasted onto a look-alike area) is redrawn; after `MAX_TRIES` a
saturated patch is used, so an anomalous item always has a non-empty mask.

`SyntheticAnomalies` is a Dataset over normal samples (or in-memory RGB arrays) returning the same items as
`model.dataset_loading.InspectionDataset`; it is deterministic given (seed, epoch, index).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from model.dataset_loading import TransformName, check_transform, error_item, load_image
from model.datasets import Sample, SampleError
from model.preprocess import OPENAI_MEAN, OPENAI_STD, fast_transform, reference_transform

KINDS = ("cutpaste", "noise")
CHANGE_THRESHOLD = 12  # grey levels (of 255) of max-over-channels change that count as a visible change
MIN_AREA_FRACTION = 0.001  # smallest accepted anomaly, as a fraction of the image
MAX_TRIES = 8


def make_synthetic_anomaly(
    rgb: np.ndarray, rng: np.random.Generator, kind: str, source: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic anomaly on an RGB uint8 image (H,W,3) → (anomalous RGB uint8 (H,W,3), mask uint8 (H,W) {0,1}).

    `source`: another image (RGB uint8, any size) to cut from ("cutpaste") or to take a texture from ("noise");
    without it the image itself is the cut source and noise comes from generated noise only.
    The input is not modified. Pixels where the mask is 0 are exactly the input's.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic anomaly kind {kind!r}; expected one of {', '.join(KINDS)}")
    rgb = _check_rgb(rgb, "image")
    if source is not None:
        source = _check_rgb(source, "source")
    height, width = rgb.shape[:2]
    min_area = max(16, int(MIN_AREA_FRACTION * height * width))
    for _ in range(MAX_TRIES):
        if kind == "cutpaste":
            changed, region = _cut_paste(rgb, rng, source)
        else:
            changed, region = _noise_blend(rgb, rng, source)
        result, mask = _keep_meaningful_change(rgb, changed, region)
        if int(mask.sum()) >= min_area:
            return result, mask
    # Every draw landed on a look-alike area (e.g. a uniform image): a saturated patch always shows.
    region = _blob_region(height, width, rng)
    changed = np.where(rgb > 127, 0, 255).astype(np.uint8)
    return _keep_meaningful_change(rgb, changed, region)


def _check_rgb(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"{name} must be an RGB uint8 array (H,W,3), got {array.dtype} {array.shape}")
    if min(array.shape[:2]) < 8:
        raise ValueError(f"{name} is {array.shape[1]}x{array.shape[0]}, smaller than 8x8")
    return array


def _keep_meaningful_change(
    original: np.ndarray, changed: np.ndarray, region: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mask = region ∩ visible change (smoothed so that a textured paste gives a solid mask, not speckle)."""
    difference = np.abs(changed.astype(np.int16) - original.astype(np.int16)).max(axis=2).astype(np.float32)
    smoothed = cv2.GaussianBlur(difference, (0, 0), 1.5)
    mask = (region & (smoothed >= CHANGE_THRESHOLD)).astype(np.uint8)
    result = np.where(mask[:, :, None].astype(bool), changed, original).astype(np.uint8)
    return result, mask


# --------------------------------------------------------------------------------------------- shapes


def _fractal_noise(
    height: int, width: int, rng: np.random.Generator, base_cells: int = 4, octaves: int = 4
) -> np.ndarray:
    """Perlin-like noise in [0,1]: random grids of doubling resolution, bicubic-upsampled and summed."""
    total = np.zeros((height, width), np.float32)
    amplitude, weight = 1.0, 0.0
    cells = base_cells
    for _ in range(octaves):
        grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
        total += amplitude * cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
        weight += amplitude
        amplitude *= 0.5
        cells *= 2
    total /= weight
    low, high = float(total.min()), float(total.max())
    return (total - low) / max(high - low, 1e-6)


def _blob(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """An irregular filled shape inside a height x width box: thresholded noise under an elliptic falloff."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ellipse = ((yy + 0.5) / height * 2 - 1) ** 2 + ((xx + 0.5) / width * 2 - 1) ** 2
    noise = _fractal_noise(height, width, rng, base_cells=int(rng.integers(2, 5)), octaves=3)
    shape = (noise * 0.9 - ellipse * 0.8) > rng.uniform(-0.35, -0.05)
    if shape.sum() < 4:  # a degenerate draw: fall back to the ellipse itself
        shape = ellipse <= 1.0
    return shape


def _patch_size(height: int, width: int, rng: np.random.Generator, shape: str) -> tuple[int, int]:
    if shape == "scar":  # CutPaste-scar: long and thin
        long_side = rng.uniform(0.1, 0.3) * min(height, width)
        short_side = rng.uniform(0.01, 0.04) * min(height, width)
        patch_h, patch_w = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    else:
        area = rng.uniform(0.005, 0.06) * height * width
        aspect = np.exp(rng.uniform(np.log(0.3), np.log(3.3)))
        patch_h, patch_w = np.sqrt(area * aspect), np.sqrt(area / aspect)
    return (int(np.clip(patch_h, 4, height - 2)), int(np.clip(patch_w, 4, width - 2)))


def _blob_region(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    patch_h, patch_w = _patch_size(height, width, rng, "blob")
    top = int(rng.integers(0, height - patch_h + 1))
    left = int(rng.integers(0, width - patch_w + 1))
    region = np.zeros((height, width), bool)
    region[top : top + patch_h, left : left + patch_w] = _blob(patch_h, patch_w, rng)
    return region


# --------------------------------------------------------------------------------------------- kinds


def _colour_jitter(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gain = rng.uniform(0.75, 1.25) * rng.uniform(0.9, 1.1, size=3)
    offset = rng.uniform(-25, 25) + rng.uniform(-10, 10, size=3)
    mean = patch.reshape(-1, 3).mean(axis=0)
    contrast = rng.uniform(0.7, 1.3)
    jittered = (patch.astype(np.float32) - mean) * contrast + mean
    return np.clip(jittered * gain + offset, 0, 255).astype(np.uint8)


def _cut_paste(
    rgb: np.ndarray, rng: np.random.Generator, source: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    height, width = rgb.shape[:2]
    cut_from = source if source is not None and rng.random() < 0.5 else rgb
    if cut_from.shape[:2] != (height, width):
        cut_from = cv2.resize(cut_from, (width, height), interpolation=cv2.INTER_AREA)
    shape = str(rng.choice(["rectangle", "scar", "blob"]))
    patch_h, patch_w = _patch_size(height, width, rng, shape)
    top = int(rng.integers(0, height - patch_h + 1))
    left = int(rng.integers(0, width - patch_w + 1))
    patch = _colour_jitter(cut_from[top : top + patch_h, left : left + patch_w], rng)
    if shape == "blob":
        patch_mask = _blob(patch_h, patch_w, rng).astype(np.uint8)
    else:
        patch_mask = np.ones((patch_h, patch_w), np.uint8)
    if rng.random() < 0.5:
        patch, patch_mask = patch[:, ::-1], patch_mask[:, ::-1]
    # Rotate on a canvas large enough to hold the rotated patch.
    angle = rng.uniform(-45, 45) if shape != "scar" else rng.uniform(-90, 90)
    side = int(np.ceil(np.hypot(patch_h, patch_w))) + 2
    side = min(side, height, width)
    matrix = cv2.getRotationMatrix2D((patch_w / 2, patch_h / 2), angle, 1.0)
    matrix[:, 2] += (side / 2 - patch_w / 2, side / 2 - patch_h / 2)
    rotated = cv2.warpAffine(np.ascontiguousarray(patch), matrix, (side, side), flags=cv2.INTER_LINEAR)
    rotated_mask = cv2.warpAffine(
        np.ascontiguousarray(patch_mask), matrix, (side, side), flags=cv2.INTER_NEAREST
    )
    paste_top = int(rng.integers(0, height - side + 1))
    paste_left = int(rng.integers(0, width - side + 1))
    region = np.zeros((height, width), bool)
    region[paste_top : paste_top + side, paste_left : paste_left + side] = rotated_mask > 0
    changed = rgb.copy()
    window = changed[paste_top : paste_top + side, paste_left : paste_left + side]
    window[rotated_mask > 0] = rotated[rotated_mask > 0]
    return changed, region


def _noise_blend(
    rgb: np.ndarray, rng: np.random.Generator, source: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    height, width = rgb.shape[:2]
    region = _blob_region(height, width, rng)
    choices = ["perlin", "gaussian"] + (["texture"] if source is not None else [])
    fill = str(rng.choice(choices))
    if fill == "perlin":
        noise = _fractal_noise(height, width, rng, base_cells=int(rng.integers(4, 16)))
        low, high = rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3)
        anomaly = low + noise[:, :, None] * (high - low)
    elif fill == "gaussian":
        noise = rng.normal(0.0, 1.0, size=(height, width, 3)).astype(np.float32)
        noise = cv2.GaussianBlur(noise, (0, 0), rng.uniform(0.5, 3.0))
        noise *= rng.uniform(30, 70) / max(float(noise.std()), 1e-6)  # smoothing shrinks it: rescale
        anomaly = rgb.astype(np.float32) + noise
    else:
        texture = cv2.resize(source, (width, height), interpolation=cv2.INTER_AREA)
        anomaly = _colour_jitter(np.rot90(texture, int(rng.integers(0, 4))).copy(), rng)
        if anomaly.shape[:2] != (height, width):
            anomaly = cv2.resize(anomaly, (width, height), interpolation=cv2.INTER_AREA)
    beta = rng.uniform(0.0, 0.6)  # DRAEM's blend: the share of the original kept in the region
    blended = (1.0 - beta) * np.asarray(anomaly, np.float32) + beta * rgb.astype(np.float32)
    changed = rgb.copy()
    changed[region] = np.clip(blended[region] + 0.5, 0, 255).astype(np.uint8)
    return changed, region


# --------------------------------------------------------------------------------------------- dataset


def _normalise_rgb(rgb: np.ndarray, image_size: int) -> torch.Tensor:
    """An RGB uint8 image already at the model size → the normalised model input (resizing to S is a no-op)."""
    return reference_transform(Image.fromarray(rgb), image_size)


def _model_size_rgb(tensor: torch.Tensor) -> np.ndarray:
    """Undo the normalisation of a transform's output: exact, since both transforms normalise uint8 values."""
    mean = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(3, 1, 1)
    values = ((tensor * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)
    return values.permute(1, 2, 0).contiguous().numpy()


class SyntheticAnomalies(Dataset):
    """Normal images, each made anomalous with probability `p_anomaly` (deterministic given seed, epoch, index).

    Items are those of `InspectionDataset`: anomalous ones have label 1, has_mask True, defect
    "synthetic_<kind>" and the mask of what changed; normals pass through with label 0 and a zero mask.
    `normals`: Samples with label 0, or RGB uint8 arrays (H,W,3) (their category is `category`).
    Call `set_epoch(n)` between epochs for fresh anomalies.
    """

    def __init__(
        self,
        normals: Sequence[Sample | np.ndarray],
        image_size: int = 518,
        p_anomaly: float = 0.5,
        seed: int = 0,
        kinds: Sequence[str] = KINDS,
        transform: TransformName = "reference",
        category: str = "object",
    ):
        check_transform(transform, image_size)
        if not 0.0 <= p_anomaly <= 1.0:
            raise ValueError(f"p_anomaly must be in [0, 1], got {p_anomaly}")
        unknown = [kind for kind in kinds if kind not in KINDS]
        if unknown or not kinds:
            raise ValueError(
                f"unknown synthetic anomaly kind(s) {unknown or kinds}; expected some of {KINDS}"
            )
        for index, normal in enumerate(normals):
            if isinstance(normal, Sample):
                if normal.label != 0:
                    raise ValueError(
                        f"{normal.path}: SyntheticAnomalies needs normal samples, this one has label 1"
                    )
            else:
                _check_rgb(normal, f"normals[{index}]")
        self.normals = list(normals)
        self.image_size = image_size
        self.p_anomaly = p_anomaly
        self.seed = seed
        self.kinds = tuple(kinds)
        self.transform = transform
        self.category = category
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.normals)

    def _describe(self, index: int) -> tuple[str, str]:
        normal = self.normals[index]
        if isinstance(normal, Sample):
            return str(normal.path), normal.category
        return f"<array {index}>", self.category

    def _load(self, index: int) -> torch.Tensor:
        """The normal image as the chosen transform makes it (normalised, 3,S,S)."""
        normal = self.normals[index]
        if isinstance(normal, Sample):
            return load_image(Path(normal.path), self.image_size, self.transform)
        if self.transform == "reference":
            return reference_transform(Image.fromarray(np.ascontiguousarray(normal)), self.image_size)
        return fast_transform(np.ascontiguousarray(normal), self.image_size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, category = self._describe(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        try:
            image = self._load(index)
        except SampleError as exc:
            return error_item(path, str(exc), self.image_size)
        size = self.image_size
        if rng.random() >= self.p_anomaly:
            return {
                "image": image,
                "mask": torch.zeros(size, size, dtype=torch.float32),
                "label": 0,
                "has_mask": True,
                "category": category,
                "defect": "good",
                "path": path,
            }
        kind = self.kinds[int(rng.integers(len(self.kinds)))]
        source = None
        if len(self.normals) > 1 and rng.random() < 0.5:
            other = int(rng.integers(len(self.normals) - 1))
            other += other >= index  # any normal but this one
            try:
                source = _model_size_rgb(self._load(other))
            except SampleError:
                source = None  # an unreadable source only narrows the choice; its own item reports it
        anomalous, mask = make_synthetic_anomaly(_model_size_rgb(image), rng, kind, source)
        return {
            "image": _normalise_rgb(anomalous, size),
            "mask": torch.from_numpy(mask.astype(np.float32)),
            "label": 1,
            "has_mask": True,
            "category": category,
            "defect": f"synthetic_{kind}",
            "path": path,
        }
