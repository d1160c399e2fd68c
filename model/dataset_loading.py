"""Labelled samples (model/datasets.py finds them) as model inputs: images and masks as tensors, and the torch
`Dataset`s training and evaluation read.

`InspectionDataset` turns samples into model inputs with the same semantics as the official loader: normals get an
all-zero mask; anomalous images without a pixel annotation (image-level labels only) also get a zero mask, but are
marked `has_mask=False` so that training uses only the global loss for them and pixel metrics leave them out.
A sample that cannot be read comes back as an error item, and `collate_samples` moves those into the batch's
`errors`, so one bad file never stops a training or evaluation run. `MosaicDataset`: AdaCLIP's mosaic augmentation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from model.datasets import Sample, SampleError
from model.preprocess import (
    ImageDecodeError,
    decode_image,
    fast_transform,
    mask_transform,
    open_pil,
    reference_transform,
)

log = logging.getLogger(__name__)

TRANSFORMS = ("reference", "fast")
TransformName = Literal["reference", "fast"]


def check_transform(transform: str, image_size: int) -> None:
    """Raise ValueError for an unknown transform name or a non-positive image size."""
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; expected one of {', '.join(TRANSFORMS)}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")


def load_image(path: Path, image_size: int, transform: TransformName = "reference") -> torch.Tensor:
    """A file → normalised model input (3,S,S); raises SampleError naming the file."""
    try:
        if transform == "reference":
            return reference_transform(open_pil(path), image_size)
        return fast_transform(decode_image(path), image_size)
    except ImageDecodeError as exc:
        raise SampleError(str(exc)) from exc


def load_mask(sample: Sample, image_size: int) -> torch.Tensor:
    """The sample's mask at the model size, float {0,1} (S,S): zeros for normals and image-level-only samples."""
    if sample.label == 0 or not sample.has_mask or sample.mask_path is None:
        return torch.zeros(image_size, image_size, dtype=torch.float32)
    if not sample.mask_path.is_file():
        raise SampleError(f"{sample.mask_path}: mask file of {sample.path} does not exist")
    try:
        mask = open_pil(sample.mask_path)
    except ImageDecodeError as exc:
        raise SampleError(f"mask of {sample.path}: {exc}") from exc
    image_size_wh = _image_size(sample.path)
    if image_size_wh is not None and mask.size != image_size_wh:
        raise SampleError(f"{sample.mask_path}: mask is {mask.width}x{mask.height} but its image {sample.path} is "
                          f"{image_size_wh[0]}x{image_size_wh[1]}")
    return mask_transform(mask, image_size)


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the image header only; None when unreadable (the image load reports that)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def load_sample(
    sample: Sample, image_size: int = 518, transform: TransformName = "reference"
) -> dict[str, Any]:
    """One sample as a dataset item (see InspectionDataset); raises SampleError when it cannot be used."""
    check_transform(transform, image_size)
    image = load_image(sample.path, image_size, transform)
    mask = load_mask(sample, image_size)
    return {
        "image": image,
        "mask": mask,
        "label": int(sample.label),
        "has_mask": bool(sample.has_mask),
        "category": sample.category,
        "defect": sample.defect,
        "path": str(sample.path),
    }


def error_item(path: str | Path, message: str, image_size: int | None = None) -> dict[str, Any]:
    """The item a dataset returns for a sample it cannot load (collate_samples moves it into `errors`)."""
    item: dict[str, Any] = {"error": message, "path": str(path)}
    if image_size is not None:
        item["image_size"] = image_size  # lets an all-bad batch still have (0,3,S,S) images
    return item


class InspectionDataset(Dataset):
    """Samples → `{"image": (3,S,S), "mask": (S,S) float {0,1}, "label", "has_mask", "category", "defect", "path"}`.

    An unusable sample yields `{"error": message naming the file, "path": ...}` instead of raising: use
    `collate_samples` as the DataLoader's collate_fn.
    """

    def __init__(
        self, samples: Sequence[Sample], image_size: int = 518, transform: TransformName = "reference"
    ):
        check_transform(transform, image_size)
        self.samples = list(samples)
        self.image_size = image_size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        try:
            return load_sample(sample, self.image_size, self.transform)
        except SampleError as exc:
            return error_item(sample.path, str(exc), self.image_size)


def collate_samples(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack the good items of a batch; error items go to `errors` as (path, message).

    Returns `image` (B,3,S,S), `mask` (B,S,S), `label` int64 (B,), `has_mask` bool (B,), and lists `category`,
    `defect`, `path`, `errors`. An all-bad batch has B = 0.
    """
    good = [item for item in batch if "error" not in item]
    errors = [(str(item.get("path", "?")), str(item["error"])) for item in batch if "error" in item]
    if good:
        images = torch.stack([item["image"] for item in good])
        masks = torch.stack([item["mask"] for item in good])
    else:
        size = next((int(item["image_size"]) for item in batch if "image_size" in item), 0)
        images = torch.zeros(0, 3, size, size)
        masks = torch.zeros(0, size, size)
    return {
        "image": images,
        "mask": masks,
        "label": torch.tensor([int(item["label"]) for item in good], dtype=torch.int64),
        "has_mask": torch.tensor([bool(item["has_mask"]) for item in good], dtype=torch.bool),
        "category": [item["category"] for item in good],
        "defect": [item.get("defect", "") for item in good],
        "path": [item["path"] for item in good],
        "errors": errors,
    }


class MosaicDataset(Dataset):
    """AdaCLIP's 2x2 same-category mosaic augmentation around an `InspectionDataset`.

    With probability `probability` (deterministic per seed, epoch and index) an item becomes a 2x2 tiling of itself
    and three random images of its category, each shrunk to half size (masks with nearest neighbour). The tile is
    anomalous if any of its four parts is, and has a pixel mask only if every anomalous part has one. The official
    code builds the mosaic from the raw images before the resize; shrinking the already resized images is the same up
    to resampling detail and keeps this a wrapper.
    """

    def __init__(self, base: InspectionDataset, probability: float = 0.2, seed: int = 111) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"mosaic probability {probability} is not in [0, 1]")
        self.base, self.probability, self.seed, self.epoch = base, probability, seed, 0
        self._by_category: dict[str, list[int]] = {}
        for index, sample in enumerate(base.samples):
            self._by_category.setdefault(sample.category, []).append(index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import numpy as np
        import torch.nn.functional as F

        item = self.base[index]
        rng = np.random.default_rng((self.seed, self.epoch, index))
        if "error" in item or rng.random() >= self.probability:
            return item
        peers = self._by_category[self.base.samples[index].category]
        parts = [item] + [self.base[int(i)] for i in rng.choice(peers, size=3)]
        if any("error" in part for part in parts):
            return item  # a bad peer: keep the plain image rather than drop a good one
        half = self.base.image_size // 2
        size = self.base.image_size
        images = F.interpolate(torch.stack([p["image"] for p in parts]), size=(half, half), mode="bilinear",
                               antialias=True, align_corners=False)
        masks = F.interpolate(torch.stack([p["mask"] for p in parts])[:, None], size=(half, half), mode="nearest")[:, 0]
        image = torch.zeros(3, size, size)
        mask = torch.zeros(size, size)
        for tile, (row, col) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            image[:, row * half : (row + 1) * half, col * half : (col + 1) * half] = images[tile]
            mask[row * half : (row + 1) * half, col * half : (col + 1) * half] = masks[tile]
        label = int(any(int(p["label"]) for p in parts))
        has_mask = all(bool(p["has_mask"]) or int(p["label"]) == 0 for p in parts)
        return {**item, "image": image, "mask": mask, "label": label, "has_mask": has_mask,
                "path": f"mosaic:{item['path']}"}
