"""Labelled inspection images for training and evaluating the detectors.

Where the samples come from:
- `load_meta`: the AnomalyCLIP/AdaCLIP `meta.json` format,
  `{"train"|"test": {cls: [{"img_path", "mask_path", "cls_name", "specie_name", "anomaly"}]}}`, paths relative
  to the dataset root. VisA, MPDD, BTAD, etc. are normally given this way: the official AnomalyCLIP and AdaCLIP
  repositories ship a generator script per dataset that writes the meta.json.
- `scan_folder`: plain layouts without a meta.json:
  (a) MVTec-style `root/<category>/test/<defect>/*.png` with masks at
      `root/<category>/ground_truth/<defect>/<stem>_mask.png`; root may also be one category folder. BTAD's layout
      (`<category>/test/ok|ko`, masks `<category>/ground_truth/ko/<stem>.png|.bmp`) reads the same way.
  (b) a plain folder `root/good/`, `root/<defect>/`, optional masks `root/ground_truth/<defect>/<stem>[_mask].png`;
      the category is root's name.
  (c) several such folders: `root/<class>/good/`, `root/<class>/<defect>/` (masks in `root/<class>/ground_truth/`).
  (d) KolektorSDD: `root/kosNN/PartN.jpg` with its pixel label `PartN_label.bmp` beside it (root may also be one
      `kosNN` folder); a part is anomalous iff its label has a non-zero pixel. The category is root's name.
  Masks may be PNG, BMP or TIFF (any format the decoders read); a mask must have its image's size.
- `discover`: meta.json when given or present in root, else `scan_folder`.

Turning samples into model inputs (images, masks, the torch datasets): model/dataset_loading.py.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.preprocess import (
    IMAGE_SUFFIXES,
    ImageDecodeError,
    open_pil,
)

log = logging.getLogger(__name__)

# Folder names that hold defect-free images: MVTec/VisA/MPDD use "good", BTAD uses "ok".
NORMAL_FOLDER_NAMES = frozenset({"good", "ok"})


class DatasetError(ValueError):
    """A dataset description that cannot be used (missing root, malformed meta.json, unknown split, no images)."""


class SampleError(ValueError):
    """One sample that cannot be used (unreadable image or mask); the message names the file."""


@dataclass(frozen=True)
class Sample:
    """One labelled image. `has_mask` is False for anomalous images that carry only an image-level label."""

    path: Path
    category: str
    defect: str  # "good" for normals
    label: int  # 0 normal, 1 anomalous
    mask_path: Path | None
    has_mask: bool


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


# --------------------------------------------------------------------------------------------- meta.json


def load_meta(
    root: str | Path, meta: str | Path | Mapping[str, Any] | None = None, split: str = "test"
) -> list[Sample]:
    """Samples of one split of an AnomalyCLIP/AdaCLIP meta.json (default `root/meta.json`), in file order.

    `meta` may be a path (relative paths are taken from the current directory) or the already parsed dict.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root is not a directory")
    if isinstance(meta, Mapping):
        source, document = "<meta dict>", meta
    else:
        meta_path = Path(meta) if meta is not None else root / "meta.json"
        source = str(meta_path)
        try:
            document = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise DatasetError(f"{meta_path}: meta.json not found") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DatasetError(f"{meta_path}: not a readable meta.json ({exc})") from exc
    if not isinstance(document, Mapping):
        raise DatasetError(f"{source}: expected an object with splits at the top level")
    if split not in document:
        available = ", ".join(sorted(str(key) for key in document)) or "none"
        raise DatasetError(f"{source}: no split {split!r}; available splits: {available}")
    classes = document[split]
    if not isinstance(classes, Mapping):
        raise DatasetError(f"{source}: split {split!r} must map class names to lists of items")
    samples: list[Sample] = []
    for class_name, items in classes.items():
        if not isinstance(items, list):
            raise DatasetError(f"{source}: {split}/{class_name} must be a list of items")
        for index, item in enumerate(items):
            samples.append(
                _meta_item(root, item, f"{source}: {split}/{class_name}[{index}]", str(class_name))
            )
    return samples


def _meta_item(root: Path, item: Any, where: str, class_name: str) -> Sample:
    if not isinstance(item, Mapping):
        raise DatasetError(f"{where}: expected an object, got {type(item).__name__}")
    missing = [key for key in ("img_path", "anomaly") if key not in item]
    if missing:
        raise DatasetError(f"{where}: missing key(s) {', '.join(missing)}")
    try:
        label = int(item["anomaly"])
    except (TypeError, ValueError):
        label = -1
    if label not in (0, 1) or isinstance(item["anomaly"], str):
        raise DatasetError(f"{where}: 'anomaly' must be 0 or 1, got {item['anomaly']!r}")
    if not item["img_path"]:
        raise DatasetError(f"{where}: empty 'img_path'")
    category = str(item.get("cls_name") or class_name)
    if label == 0:
        return Sample(root / item["img_path"], category, "good", 0, None, True)
    defect = str(item.get("specie_name") or "anomaly")
    mask_name = item.get("mask_path") or ""
    mask_path = root / mask_name if mask_name else None
    # The official loader treats an empty mask_path or one naming a directory as "no pixel annotation".
    if mask_path is None or mask_path.is_dir():
        return Sample(root / item["img_path"], category, defect, 1, None, False)
    # A named mask file that is missing is reported when the sample is loaded, not silently dropped.
    return Sample(root / item["img_path"], category, defect, 1, mask_path, True)


# --------------------------------------------------------------------------------------------- folders


def scan_folder(root: str | Path, split: str = "test") -> list[Sample]:
    """Samples from a folder layout without meta.json (see the module docstring), sorted by category, defect, name.

    `split` picks `<category>/<split>/` in MVTec-style layouts (e.g. "train" for MVTec's `train/good`).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root is not a directory")
    if (root / split).is_dir():  # root is one MVTec-style category
        samples = _scan_category(root / split, root / "ground_truth", root.name)
    elif _is_kolektor_folder(root) or any(_is_kolektor_folder(d) for d in _subdirs(root)):
        _only_test_split(root, split, "KolektorSDD")
        samples = scan_kolektor(root)
    else:
        category_dirs = [d for d in _subdirs(root) if (d / split).is_dir()]
        class_dirs = [d for d in _subdirs(root) if _has_normal_folder(d)]
        if not category_dirs:
            _only_test_split(root, split, "this")
        if category_dirs:
            samples = []
            for category_dir in category_dirs:
                samples += _scan_category(
                    category_dir / split, category_dir / "ground_truth", category_dir.name
                )
        elif class_dirs and not _has_normal_folder(root):  # root/<class>/{good,<defect>}
            samples = []
            for class_dir in class_dirs:
                samples += _scan_category(class_dir, class_dir / "ground_truth", class_dir.name)
        else:  # plain folder: root/good, root/<defect>, root/ground_truth/<defect>
            samples = _scan_category(root, root / "ground_truth", root.name)
    if not samples:
        raise DatasetError(f"{root}: no images found in a known dataset layout ({describe_folder(root)}); expected "
                           + expected_layouts(split))
    return samples


def _only_test_split(root: Path, split: str, layout: str) -> None:
    """A layout without split folders holds test images only: any other split would be those same images (a
    reference pool drawn from it would leak into the test set)."""
    if split != "test":
        raise DatasetError(f"{root}: {layout} layout has no {split!r} split (its images are all test images)")


def expected_layouts(split: str = "test") -> str:
    return (f"a meta.json (AnomalyCLIP/AdaCLIP format), <category>/{split}/<defect>/<image> with masks in "
            f"<category>/ground_truth/<defect>/ (MVTec AD, BTAD), {split}/<defect>/<image> inside one category, "
            "good/ and <defect>/ folders of images (or <class>/good/ and <class>/<defect>/), or KolektorSDD's "
            "kosNN/PartN.jpg with PartN_label.bmp")


def describe_folder(root: Path) -> str:
    """What a folder holds, for error messages: its subfolders and how many images sit where."""
    subdirs = _subdirs(root)
    direct = sum(1 for p in root.iterdir() if is_image_file(p))
    deeper = sum(1 for p in root.rglob("*") if is_image_file(p)) - direct
    names = ", ".join(d.name for d in subdirs[:8]) + (" ..." if len(subdirs) > 8 else "")
    folders = f"{len(subdirs)} folder(s) ({names})" if subdirs else "no folders"
    return f"found {folders}, {direct} image(s) directly inside and {deeper} in subfolders"


def _subdirs(path: Path) -> list[Path]:
    return sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))


def _has_normal_folder(path: Path) -> bool:
    return any(d.name.lower() in NORMAL_FOLDER_NAMES for d in _subdirs(path))


# --------------------------------------------------------------------------------------------- KolektorSDD

KOLEKTOR_LABEL_SUFFIX = "_label"


def _is_kolektor_folder(path: Path) -> bool:
    """A folder of images each with a `<stem>_label.<ext>` pixel label beside it (KolektorSDD's kosNN)."""
    files = [p for p in path.iterdir() if is_image_file(p)]
    labels = {p.stem[: -len(KOLEKTOR_LABEL_SUFFIX)] for p in files if p.stem.endswith(KOLEKTOR_LABEL_SUFFIX)}
    return bool(labels) and any(p.stem in labels for p in files)


def _mask_has_defect(path: Path) -> bool:
    import numpy as np

    try:
        return bool(np.asarray(open_pil(path).convert("L")).any())
    except ImageDecodeError as exc:
        raise DatasetError(f"KolektorSDD label {path}: {exc}") from exc


def scan_kolektor(root: str | Path) -> list[Sample]:
    """KolektorSDD: every `PartN.<ext>` with its `PartN_label.<ext>`; anomalous iff the label has a non-zero pixel.

    Parts without a label file are reported and left out (their ground truth is unknown)."""
    root = Path(root)
    folders = [root] if _is_kolektor_folder(root) else [d for d in _subdirs(root) if _is_kolektor_folder(d)]
    samples: list[Sample] = []
    unlabelled: list[str] = []
    for folder in folders:
        files = sorted(p for p in folder.iterdir() if is_image_file(p))
        labels = {p.stem[: -len(KOLEKTOR_LABEL_SUFFIX)]: p for p in files if p.stem.endswith(KOLEKTOR_LABEL_SUFFIX)}
        for image in files:
            if image.stem.endswith(KOLEKTOR_LABEL_SUFFIX):
                continue
            label = labels.get(image.stem)
            if label is None:
                unlabelled.append(str(image))
                continue
            if _mask_has_defect(label):
                samples.append(Sample(image, root.name, "defect", 1, label, True))
            else:
                samples.append(Sample(image, root.name, "good", 0, None, True))
    if unlabelled:
        log.warning("%s: %d KolektorSDD part(s) without a _label file left out, e.g. %s", root, len(unlabelled),
                    unlabelled[0])
    return samples


def is_mask_file(path: str | Path) -> bool:
    """A pixel label of a known dataset layout rather than an image to score: KolektorSDD's `*_label.*` next to
    its part, MVTec-style `*_mask.*` or anything under a `ground_truth` folder, KolektorSDD2's `*_GT.*`."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return False
    if "ground_truth" in path.parts[:-1]:
        return True
    for suffix in (KOLEKTOR_LABEL_SUFFIX, "_GT", "_mask"):
        if path.stem.endswith(suffix):
            partner = path.stem[: -len(suffix)]
            if any(path.with_name(partner + ext).is_file() for ext in _SIBLING_EXTENSIONS):
                return True
    return False


_SIBLING_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".JPG", ".PNG", ".BMP")


def class_balance(samples: Sequence[Sample]) -> tuple[int, int]:
    """(normal, anomalous) image counts."""
    anomalous = sum(1 for sample in samples if sample.label == 1)
    return len(samples) - anomalous, anomalous


def require_both_classes(samples: Sequence[Sample], root: str | Path, purpose: str) -> None:
    """DatasetError when the samples lack normal or anomalous images (image AUROC/AP, training need both)."""
    normal, anomalous = class_balance(samples)
    if normal and anomalous:
        return
    categories = sorted({sample.category for sample in samples})
    missing = "normal (defect-free)" if not normal else "anomalous"
    raise DatasetError(
        f"{root}: found {normal} normal and {anomalous} anomalous image(s) in {len(categories)} "
        f"categor{'y' if len(categories) == 1 else 'ies'} ({', '.join(categories[:6])}); {purpose} needs "
        f"{missing} images too. Expected layouts: {expected_layouts()}")


def _scan_category(images_dir: Path, masks_dir: Path, category: str) -> list[Sample]:
    samples: list[Sample] = []
    unmatched = 0
    for defect_dir in sorted(d for d in images_dir.iterdir() if d.is_dir() and d.name != "ground_truth"):
        images = sorted(p for p in defect_dir.iterdir() if is_image_file(p))
        if defect_dir.name.lower() in NORMAL_FOLDER_NAMES:
            samples += [Sample(p, category, "good", 0, None, True) for p in images]
            continue
        for image in images:
            mask = _find_mask(masks_dir / defect_dir.name, image.stem)
            unmatched += mask is None
            samples.append(Sample(image, category, defect_dir.name, 1, mask, mask is not None))
    if unmatched:
        log.warning(
            "%s: %d anomalous image(s) have no mask under %s; they count as image-level labels only",
            category,
            unmatched,
            masks_dir,
        )
    return samples


def _find_mask(folder: Path, stem: str) -> Path | None:
    if not folder.is_dir():
        return None
    for name in (f"{stem}_mask", stem):
        for candidate in sorted(folder.glob(f"{name}.*")):
            if is_image_file(candidate):
                return candidate
    return None


def discover(
    root: str | Path, meta: str | Path | Mapping[str, Any] | None = None, split: str = "test"
) -> list[Sample]:
    """meta.json when given or present in root, else a folder scan; raises DatasetError when nothing is found."""
    root = Path(root)
    if meta is not None or (root / "meta.json").is_file():
        samples = load_meta(root, meta, split)
    else:
        samples = scan_folder(root, split)
    if not samples:
        raise DatasetError(f"{root}: split {split!r} has no samples")
    return samples
