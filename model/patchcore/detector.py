"""PatchCore behind the Detector protocol: references → memory bank (saved per source), input conversion, device.

Inputs follow the project's contract (RGB normalised with OpenAI CLIP's mean/std, as the daemon and `eval` make
them); the detector turns them into the TensorFlow normalisation the EfficientNet-Lite weights were trained with,
(x/255 - 0.5)/0.5, exactly (an affine map per channel). Scores are anomalib's (Euclidean feature distances, not
bounded to 0-1).

The memory bank is built from normal references: a folder or list of image files, in-memory tensors
(`set_references`, for k-shot evaluation and the daemon), or a saved bank file. Banks are stored as safetensors
with metadata (backbone, weights, taps, image size, augmentation, digest of the reference files) and a bank of
another model is refused with the value that differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.bank import SavedBank, references_digest
from model.detector import Prediction
from model.factory import imported_later, register_model
from model.geometry import Geometry, frame_inputs, predict_frames
from model.patchcore.backbone import (
    DEFAULT_BACKBONE,
    LITE_PACKAGES,
    RANDOM_WEIGHTS,
    Tap,
    TapExtractor,
    build_timm_backbone,
    parse_taps,
)
from model.patchcore.coreset import greedy_coreset
from model.patchcore.fold import fold_batchnorm
from model.patchcore.maps import upsampled_blurred
from model.patchcore.options import AUGMENTATIONS, DEFAULT_MAX_BANK_ROWS
from model.patchcore.rotation import rotated_views
from model.patchcore.torch_model import NUM_NEIGHBORS, PatchcoreModel
from model.preprocess import OPENAI_MEAN, OPENAI_STD

log = logging.getLogger(__name__)

NAME = "patchcore"
DEFAULT_IMAGE_SIZE = 256
BANK_FORMAT = "anomalyd-patchcore-bank/1"
MAX_REFERENCES = 512


class PatchcoreReferencesError(ValueError):
    """References PatchCore cannot use (none given, unreadable, of another size/channels, bank of another model)."""


def _references_error() -> type[ValueError]:
    # The project's few-shot ReferencesError when available, so callers catch one class for every model.
    try:
        from model.fewshot import ReferencesError
    except ImportError:  # pragma: no cover
        return PatchcoreReferencesError
    return ReferencesError


def clip_to_tf(images: torch.Tensor) -> torch.Tensor:
    """OpenAI-CLIP-normalised images → TF-normalised ((x - 0.5)/0.5 on [0, 1] pixels)."""
    std = torch.tensor(OPENAI_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    mean = torch.tensor(OPENAI_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return images * (2.0 * std) + (2.0 * mean - 1.0)


def augment_references(images: torch.Tensor, augment: str) -> torch.Tensor:
    """References plus their flips / quarter turns (AnomalyDINO-style augmentation of the normal set) or small turns."""
    if augment == "none":
        return images
    if augment not in AUGMENTATIONS:
        raise ValueError(f"reference augmentation {augment!r} is not one of {', '.join(AUGMENTATIONS)}")
    views = [images]
    if augment in ("flip", "d4"):
        views += [images.flip(-1), images.flip(-2)]
    if augment in ("rot90", "d4"):
        views += [torch.rot90(images, k, dims=(-2, -1)) for k in (1, 2, 3)]
    if augment == "d4":
        views += [torch.rot90(images, 1, dims=(-2, -1)).flip(-1), torch.rot90(images, 1, dims=(-2, -1)).flip(-2)]
    if augment == "rotate":  # small turns (±10°, ±20°): parts placed a few degrees off
        views += rotated_views(images)
    return torch.cat(views)


@dataclass
class PatchcoreBank(SavedBank):
    """Memory-bank rows (M, D) and the metadata that says which model and references built them."""

    rows: torch.Tensor
    metadata: dict[str, str] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write the bank (float32 rows, metadata) atomically."""
        return self._write(path, {"memory_bank": self.rows.to(torch.float32)})

    @classmethod
    def load(cls, path: str | Path) -> PatchcoreBank:
        metadata, tensors = cls._read(path, "PatchCore memory bank", _references_error())
        rows = tensors.get("memory_bank")
        if metadata.get("format") != BANK_FORMAT or rows is None or rows.ndim != 2:
            raise _references_error()(
                f"{path}: not a PatchCore memory bank (format {metadata.get('format')!r}; expected {BANK_FORMAT!r})"
            )
        return cls(rows=rows.float(), metadata=metadata)


def tensor_digest(images: torch.Tensor) -> str:
    return hashlib.sha256(images.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()[:16]


class PatchCoreDetector:
    """PatchCore (see model/patchcore/torch_model.py) with a memory bank of normal references."""

    name = NAME

    def __init__(self, model: PatchcoreModel, *, backbone: str, weights: str, image_size: int,
                 device: torch.device, dtype: torch.dtype = torch.float32, augment: str = "none",
                 max_bank_rows: int | None = DEFAULT_MAX_BANK_ROWS, batch_size: int = 8,
                 geometry: Geometry | None = None) -> None:
        if augment not in AUGMENTATIONS:
            raise ValueError(f"reference augmentation {augment!r} is not one of {', '.join(AUGMENTATIONS)}")
        self.model = model.to(device).eval()
        self.device = device
        self.dtype = dtype
        self.image_size = int(image_size)
        self.backbone_name = backbone
        self.weights = weights
        self.augment = augment
        self.max_bank_rows = max_bank_rows
        self.batch_size = batch_size
        self.bank: PatchcoreBank | None = None
        # Which pixels of a frame are fed how (model/geometry.py); references go through the same geometry.
        self.geometry = geometry or Geometry()

    # -- identity and version ------------------------------------------------------------------------------------
    @property
    def identity(self) -> dict[str, str]:
        """What a bank must have been built with to be used by this detector."""
        return {
            "model": NAME,
            "backbone": self.backbone_name,
            "weights": self.weights,
            "taps": ",".join(str(t) for t in self.model.taps),
            "image_size": str(self.image_size),
            "geometry": self.geometry.bank_tag or "squash",
        }

    @property
    def version(self) -> str:
        taps = "-".join(str(t) for t in self.model.taps)
        base = f"patchcore-{self.backbone_name}-t{taps}-s{self.image_size}"
        if self.geometry.tag:  # thresholds are kept per version: another geometry is another scale
            base += f"-{self.geometry.tag}"
        if self.bank is None:
            return base
        version = f"{base}+ref-{self.bank.digest or 'bank'}-k{self.bank.n_references}"
        # Bank options change the scores, so they are part of the version (thresholds are kept per version).
        if self.bank.metadata.get("augment", "none") != "none":
            version += f"-{self.bank.metadata['augment']}"
        if self.bank.rows.shape[0] < int(self.bank.metadata.get("full_rows", self.bank.rows.shape[0])):
            version += f"-m{self.bank.rows.shape[0]}"
        return version

    # -- references ----------------------------------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor, what: str) -> None:
        if self.geometry.resize != "squash" and images.ndim == 4 and images.shape[1] == 3:
            return  # fit / tile inputs: rectangles of the stride, or tiles
        if images.ndim != 4 or images.shape[1] != 3:
            raise _references_error()(
                f"{what} have shape {tuple(images.shape)}: expected (N, 3, {self.image_size}, {self.image_size}) "
                f"RGB images ({images.shape[1] if images.ndim == 4 else '?'} channels given)"
            )
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise _references_error()(
                f"{what} are {images.shape[-2]}x{images.shape[-1]}, the detector uses "
                f"{self.image_size}x{self.image_size}"
            )

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def build_bank(self, images: torch.Tensor | Sequence[torch.Tensor], *, digest: str = "",
                   sources: Sequence[str] = ()) -> PatchcoreBank:
        """A memory bank from reference images (K, 3, S, S), normalised as the detector's inputs are; or, with a
        fit/tile geometry, a list of each reference's inputs (N_i, 3, h_i, w_i) (`model.geometry.frame_inputs`)."""
        groups = [images] if isinstance(images, torch.Tensor) else list(images)
        if not groups or sum(g.shape[0] for g in groups) == 0:
            raise _references_error()("no reference images: PatchCore needs at least one known-good image")
        rows = []
        for group in groups:
            self._check_images(group, "reference images")
            views = augment_references(group, self.augment)
            for start in range(0, views.shape[0], self.batch_size):
                batch = clip_to_tf(views[start:start + self.batch_size].to(self.device).float())
                with self._autocast():
                    rows.append(self.model.flatten(self.model.embed(batch)).float())
        bank = torch.cat(rows)
        full_rows = bank.shape[0]
        if self.max_bank_rows and full_rows > self.max_bank_rows:
            bank = bank[greedy_coreset(bank, self.max_bank_rows)]
        metadata = {
            "format": BANK_FORMAT,
            **self.identity,
            "augment": self.augment,
            "n_references": str(len(groups) if len(groups) > 1 else groups[0].shape[0]),
            "full_rows": str(full_rows),
            "max_bank_rows": str(self.max_bank_rows or 0),
            "digest": digest or tensor_digest(torch.cat([g.flatten() for g in groups])),
            "sources": json.dumps([Path(s).name for s in sources]),
        }
        return PatchcoreBank(rows=bank.cpu(), metadata=metadata)

    def check_bank(self, bank: PatchcoreBank, origin: str) -> None:
        """Raise ReferencesError naming the first value that differs from this detector's."""
        for key, expected in self.identity.items():
            found = bank.metadata.get(key, "squash" if key == "geometry" else None)  # banks from before geometry
            if found != expected:
                raise _references_error()(
                    f"{origin}: the memory bank was built with {key} {found!r}, but the detector uses {expected!r}; "
                    "rebuild it from the references for this model"
                )

    def set_bank(self, bank: PatchcoreBank, origin: str = "memory bank") -> None:
        self.check_bank(bank, origin)
        self.model.set_memory_bank(bank.rows)
        self.bank = bank

    def set_references(self, images: torch.Tensor | Sequence[torch.Tensor], *, digest: str = "",
                       sources: Sequence[str] = ()) -> PatchcoreBank:
        """Build the bank from in-memory reference images (K, 3, S, S) and use it; returns the bank."""
        bank = self.build_bank(images, digest=digest, sources=sources)
        self.set_bank(bank)
        return bank

    def load_references(self, references: str | Path | Sequence[str | Path], *,
                        cache_path: str | Path | None = None,
                        transform: Callable[[Path, int], torch.Tensor] | None = None,
                        max_references: int = MAX_REFERENCES) -> PatchcoreBank:
        """Use `references`: a saved bank file, or known-good images (a folder, a file or a list of files); the
        bank is read from `cache_path` when it holds one of the same files and model, else built (and saved)."""
        from model.fewshot import BANK_SUFFIX, load_reference_images, reference_files

        error = _references_error()
        if isinstance(references, (str, Path)) and Path(references).suffix == BANK_SUFFIX:
            bank = PatchcoreBank.load(references)
            self.set_bank(bank, str(references))
            return bank
        files = reference_files(references)
        if len(files) > max_references:
            raise error(f"{len(files)} reference images given, PatchCore uses at most {max_references}")
        digest = references_digest(files)
        if cache_path is not None and Path(cache_path).is_file():
            try:
                cached = PatchcoreBank.load(cache_path)
                self.check_bank(cached, str(cache_path))
            except ValueError as exc:
                log.info("rebuilding PatchCore bank %s: %s", cache_path, exc)
            else:
                if (cached.digest == digest and cached.metadata.get("augment") == self.augment
                        and cached.metadata.get("max_bank_rows") == str(self.max_bank_rows or 0)):
                    self.set_bank(cached, str(cache_path))
                    return cached
                log.info("rebuilding PatchCore bank %s: the reference files or the bank options changed", cache_path)
        images: torch.Tensor | list[torch.Tensor]
        if self.geometry.bank_tag:
            from model.preprocess import decode_image

            images = [frame_inputs(decode_image(f), self.geometry, self.image_size) for f in files]
        else:
            images = load_reference_images(files, self.image_size, transform)
        bank = self.build_bank(images, digest=digest, sources=[str(f) for f in files])
        self.set_bank(bank)
        if cache_path is not None:
            bank.save(cache_path)
        return bank

    # -- inference -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_tf(self, images: torch.Tensor) -> Prediction:
        """Scores and maps for TF-normalised images (the parity path)."""
        if self.bank is None:
            raise _references_error()(
                "patchcore has no memory bank: give it normal references (a folder of known-good images)"
            )
        images = images.to(self.device, non_blocking=True).float()
        with self._autocast():
            embedding = self.model.embed(images)
        scores, where, flat = self.model.patch_scores(embedding.float())
        image_scores = self.model.image_scores(scores, where, flat)
        # the map as two small matrix products (model/patchcore/maps.py), equal to `anomaly_maps` to fp32 rounding
        maps = upsampled_blurred(scores, tuple(embedding.shape[-2:]), tuple(images.shape[-2:]), self.model.sigma)
        return Prediction(scores=image_scores.float(), maps=maps.float())

    @torch.no_grad()
    def predict_frames(self, frames: Sequence[Any]) -> tuple[Any, list[Any]]:
        """(raw image scores, maps in each frame's pixels) of RGB uint8 frames of any size, under `geometry`."""
        return predict_frames(self, frames, self.geometry, batch_size=self.batch_size)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_names: Sequence[str] | None = None) -> Prediction:
        if self.geometry.resize != "squash" and images.ndim == 4 and images.shape[1] == 3:
            return self.predict_tf(clip_to_tf(images.to(self.device, non_blocking=True).float()))
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"images have shape {tuple(images.shape)}: patchcore expects (B, 3, {self.image_size}, "
                f"{self.image_size})"
            )
        return self.predict_tf(clip_to_tf(images.to(self.device, non_blocking=True).float()))


def build_patchcore(*, backbone: str = DEFAULT_BACKBONE, weights: str | Path | None = None,
                    taps: Sequence[Tap] | str | None = None, image_size: int = DEFAULT_IMAGE_SIZE,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    num_neighbors: int = NUM_NEIGHBORS, augment: str = "none",
                    max_bank_rows: int | None = DEFAULT_MAX_BANK_ROWS,
                    geometry: Geometry | None = None) -> PatchCoreDetector:
    """A PatchCore detector without references yet (see `set_references` / `load_references`)."""
    if image_size <= 0 or image_size % 32:
        raise ValueError(f"patchcore image size {image_size}: expected a positive multiple of 32")
    net, described = build_timm_backbone(backbone, weights)
    fold_batchnorm(net)  # frozen: BatchNorm is an affine map per channel, folded into its convolution (fold.py)
    extractor = TapExtractor(net, parse_taps(taps, backbone, net))
    model = PatchcoreModel(extractor, num_neighbors=num_neighbors)
    if weights not in (None, RANDOM_WEIGHTS) and backbone not in LITE_PACKAGES:
        described = Path(weights).name
    return PatchCoreDetector(model, backbone=backbone, weights=described, image_size=image_size,
                             device=torch.device(device), dtype=dtype, augment=augment, max_bank_rows=max_bank_rows,
                             geometry=geometry)


# Its own backbones, taps and input size; it scores against a bank of normal references, on any frame shape, in
# distances (its capabilities: model.factory.BUILTIN_FAMILIES).
@register_model(NAME, exporter=imported_later("model.patchcore.export", "patchcore_graph"),
                known_good=imported_later("model.patchcore.known_good", "patchcore_known_good"))
def _create_patchcore(
    *,
    backbone: str = DEFAULT_BACKBONE,
    weights: str | Path | None = None,
    taps: Sequence[Tap] | str | None = None,
    layers: Sequence[Tap] | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    references: str | Path | Sequence[str | Path] | torch.Tensor | None = None,
    references_cache: str | Path | None = None,
    augment: str = "none",
    max_bank_rows: int | None = DEFAULT_MAX_BANK_ROWS,
    references_later: bool = False,
    geometry: Geometry | None = None,
    device: torch.device,
    dtype: torch.dtype,
    **_: Any,
) -> PatchCoreDetector:
    """`references_later=True`: no bank yet, the caller gives one (`set_references`, `load_references`)."""
    if references is None and not references_later:
        raise _references_error()(
            "patchcore needs normal references: pass references= (a folder of known-good images, a list of "
            "image files, or a saved bank .safetensors); it has no zero-shot mode"
        )
    detector = build_patchcore(backbone=str(backbone), weights=weights, taps=taps or layers,
                               image_size=int(image_size), device=device, dtype=dtype, augment=augment,
                               max_bank_rows=max_bank_rows, geometry=geometry)
    if references is None:
        return detector
    if isinstance(references, torch.Tensor):
        detector.set_references(references)
    else:
        detector.load_references(references, cache_path=references_cache)
    return detector
