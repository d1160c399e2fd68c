"""Few-shot normal references: a memory bank of patch features from K known-good images, usable with any detector.

`ReferenceBank` holds, per tapped vision block, the L2-normalised patch features of the references
(K x g² rows). A query patch's few-shot score is its nearest-neighbour distance to the bank, (1 - max cos) / 2
(WinCLIP+'s visual association score, in [0, 1]), averaged over the tapped blocks; the map is that score upsampled
bilinearly and blurred (sigma 4). `FewShotDetector` wraps any Detector and combines, as WinCLIP+ does:
    map   = w * zero-shot map + (1 - w) * few-shot map                       (w = zero_shot_weight, 0.5)
    score = w * zero-shot score + (1 - w) * max(few-shot map)
The features come from the same frozen CLIP the detector uses (its `backbone`): the ordinary stream after the
chosen blocks, ln_post then proj ("proj", default) or the raw tokens ("raw").

Banks are saved per source as safetensors with metadata (backbone, image size, layers, feature kind, number of
references, a digest of the reference files) and rebuilt when the reference files change. `calibrate_threshold`
turns scores of known-good images into an alert threshold.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model._backbone import ClipBackbone, resize_position_embedding
from model._transformer import embed_patches, forward_blocks
from model.bank import SavedBank, references_digest
from model.detector import Detector, Prediction, autocast
from model.gaussian import gaussian_blur
from model.preprocess import IMAGE_SUFFIXES, decode_image, fast_transform

log = logging.getLogger(__name__)

BANK_SUFFIX = ".safetensors"
FEATURE_KINDS = ("proj", "raw")
MAX_REFERENCES = 16
BANK_FORMAT = "anomalyd-reference-bank/1"


class ReferencesError(ValueError):
    """References that cannot be used: empty folder, unreadable file, bank of another backbone or image size."""


def default_layers(n_layers: int) -> tuple[int, ...]:
    """The quarter points of the vision tower: (6, 12, 18, 24) for 24 blocks, (3, 6, 9, 12) for 12."""
    return tuple(sorted({max(1, round(n_layers * q / 4)) for q in (1, 2, 3, 4)}))


class PatchFeatureExtractor:
    """Normalised patch features (B, g², D) after chosen vision blocks of a frozen CLIP (1-indexed).

    kind "proj": ln_post(tokens) @ proj (the joint embedding space); "raw": the residual stream itself.
    """

    def __init__(self, backbone: ClipBackbone, image_size: int, layers: Sequence[int] | None = None,
                 kind: str = "proj") -> None:
        n_layers = backbone.vision_layers
        layers = tuple(int(x) for x in (layers or default_layers(n_layers)))
        if not layers or any(not 1 <= x <= n_layers for x in layers):
            raise ValueError(f"reference feature layers {list(layers)} must be vision blocks between 1 and {n_layers}")
        if kind not in FEATURE_KINDS:
            raise ValueError(f"reference feature kind {kind!r} is not one of {', '.join(FEATURE_KINDS)}")
        if image_size % backbone.patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {backbone.patch_size}")
        self.backbone = backbone
        self.image_size = int(image_size)
        self.layers = layers
        self.kind = kind
        self.grid = image_size // backbone.patch_size
        visual = backbone.clip.visual
        self._pos = resize_position_embedding(visual.positional_embedding.detach(), self.grid, "bilinear")

    @property
    def identity(self) -> dict[str, str]:
        """What a bank built by this extractor must match to be usable with it."""
        return {
            "backbone": self.backbone.name,
            "image_size": str(self.image_size),
            "layers": ",".join(str(x) for x in self.layers),
            "kind": self.kind,
        }

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.ndim != 4 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"images have shape {tuple(images.shape)}, references use {self.image_size}x{self.image_size}"
            )
        visual = self.backbone.clip.visual
        device = next(visual.parameters()).device
        images = images.to(device)
        if self._pos.device != device:
            self._pos = self._pos.to(device)

        def patch_features(_: int, x: torch.Tensor) -> torch.Tensor:
            tokens = x[:, 1:]
            if self.kind == "proj":
                tokens = visual.ln_post(tokens) @ visual.proj
            return F.normalize(tokens.float(), dim=-1)

        _, features = forward_blocks(visual.transformer.resblocks, embed_patches(visual, images, self._pos),
                                     taps=self.layers, tap=patch_features, stop_early=True)
        return features


@dataclass
class ReferenceBank(SavedBank):
    """Per tapped block, (M, D) normalised reference patch features; metadata as saved."""

    features: list[torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    @torch.no_grad()
    def build(cls, extractor: PatchFeatureExtractor, images: torch.Tensor, *, digest: str = "",
              sources: Sequence[str] = (), batch_size: int = 4) -> ReferenceBank:
        """A bank from reference images (K, 3, S, S), already preprocessed."""
        if images.shape[0] == 0:
            raise ReferencesError("no reference images: few-shot needs at least one known-good image")
        per_layer: list[list[torch.Tensor]] = [[] for _ in extractor.layers]
        for start in range(0, images.shape[0], batch_size):
            for store, feats in zip(per_layer, extractor(images[start : start + batch_size]), strict=True):
                store.append(feats.reshape(-1, feats.shape[-1]))
        metadata = {
            "format": BANK_FORMAT,
            **extractor.identity,
            "n_references": str(images.shape[0]),
            "digest": digest,
            "sources": json.dumps([Path(s).name for s in sources]),
        }
        return cls(features=[torch.cat(store) for store in per_layer], metadata=metadata)

    def to(self, device: torch.device | str) -> ReferenceBank:
        return ReferenceBank(features=[f.to(device) for f in self.features], metadata=dict(self.metadata))

    def save(self, path: str | Path) -> Path:
        """Write the bank (float16 features, metadata) atomically."""
        return self._write(path, {f"layer_{i}": f.to(torch.float16) for i, f in enumerate(self.features)})

    @classmethod
    def load(cls, path: str | Path) -> ReferenceBank:
        metadata, tensors = cls._read(path, "reference bank", ReferencesError)
        layers = sorted((k for k in tensors if k.removeprefix("layer_").isdigit()), key=lambda k: int(k[6:]))
        features = [tensors[k].float() for k in layers]
        if metadata.get("format") != BANK_FORMAT or not features:
            raise ReferencesError(f"{path}: not an anomalyd reference bank (format {metadata.get('format')!r})")
        return cls(features=features, metadata=metadata)

    def check_compatible(self, extractor: PatchFeatureExtractor, origin: str) -> None:
        """Raise ReferencesError naming the first value that differs from the extractor's."""
        for key, expected in extractor.identity.items():
            found = self.metadata.get(key)
            if found != expected:
                raise ReferencesError(
                    f"{origin}: references were built with {key} {found!r}, but the detector uses {expected!r}; "
                    "rebuild the references for this model"
                )

    def mismatches(self, extractor: PatchFeatureExtractor) -> list[str]:
        return [k for k, v in extractor.identity.items() if self.metadata.get(k) != v]

    @torch.no_grad()
    def distances(self, queries: Sequence[torch.Tensor], max_elements: int = 1 << 25) -> torch.Tensor:
        """Few-shot patch scores (B, P): (1 - max cos to the bank) / 2, averaged over the tapped blocks.

        The similarity matrix is computed in chunks of bank rows (at most `max_elements` entries at a time)."""
        if len(queries) != len(self.features):
            raise ValueError(f"{len(queries)} query layers for a bank of {len(self.features)}")
        total = None
        for query, memory in zip(queries, self.features, strict=True):
            memory = memory.to(device=query.device, dtype=query.dtype)
            batch, patches, _ = query.shape
            chunk = max(1, max_elements // max(1, batch * patches))
            best = torch.full((batch, patches), -1.0, device=query.device, dtype=query.dtype)
            for start in range(0, memory.shape[0], chunk):
                sims = query @ memory[start : start + chunk].t()
                best = torch.maximum(best, sims.amax(dim=-1))
            distance = (1.0 - best.float()) / 2.0
            total = distance if total is None else total + distance
        return total / len(self.features)


# -- reference files ---------------------------------------------------------------------------------------------

def reference_files(references: str | Path | Sequence[str | Path]) -> list[Path]:
    """Image files named by a folder (its images, sorted by name), a file, or a list of files."""
    if isinstance(references, (str, Path)):
        path = Path(references)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ReferencesError(
                    f"reference folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}): few-shot needs at "
                    "least one known-good image"
                )
            return files
        items: Sequence[str | Path] = [path]
    else:
        items = list(references)
    if not items:
        raise ReferencesError("no reference images given: few-shot needs at least one known-good image")
    files = [Path(p) for p in items]
    for file in files:
        if not file.is_file():
            raise ReferencesError(f"reference image {file} does not exist")
    return files


def load_reference_images(files: Sequence[Path], image_size: int,
                          transform: Callable[[Path, int], torch.Tensor] | None = None) -> torch.Tensor:
    """(K, 3, S, S) model inputs; the default transform is the daemon's fast (OpenCV) path."""
    tensors = []
    for file in files:
        try:
            tensors.append(transform(file, image_size) if transform else fast_transform(decode_image(file), image_size))
        except ValueError as exc:
            raise ReferencesError(f"reference image {file}: {exc}") from exc
    return torch.stack(tensors)


def _is_bank_file(references: object) -> bool:
    return isinstance(references, (str, Path)) and Path(references).suffix == BANK_SUFFIX


def load_or_build_bank(
    references: str | Path | Sequence[str | Path],
    extractor: PatchFeatureExtractor,
    *,
    cache_path: str | Path | None = None,
    transform: Callable[[Path, int], torch.Tensor] | None = None,
    max_references: int = MAX_REFERENCES,
) -> ReferenceBank:
    """The bank for `references`: a saved bank file (checked against the extractor), or images (folder or
    files), read from `cache_path` when it holds a bank of the same files and model, else built (and saved)."""
    if _is_bank_file(references):
        bank = ReferenceBank.load(references)
        bank.check_compatible(extractor, str(references))
        return bank
    files = reference_files(references)
    if len(files) > max_references:
        raise ReferencesError(
            f"{len(files)} reference images given, at most {max_references} are used for few-shot: pick the "
            "most representative known-good images"
        )
    digest = references_digest(files)
    if cache_path is not None and Path(cache_path).is_file():
        try:
            cached = ReferenceBank.load(cache_path)
        except ReferencesError as exc:
            log.warning("ignoring reference cache %s: %s", cache_path, exc)
        else:
            stale = cached.mismatches(extractor) + (["digest"] if cached.digest != digest else [])
            if not stale:
                return cached
            log.info("rebuilding reference bank %s: %s changed", cache_path, ", ".join(stale))
    images = load_reference_images(files, extractor.image_size, transform)
    bank = ReferenceBank.build(extractor, images, digest=digest, sources=[str(f) for f in files])
    if cache_path is not None:
        bank.save(cache_path)
    return bank


# -- detector wrapper --------------------------------------------------------------------------------------------

def detector_backbone(detector: Detector) -> ClipBackbone | None:
    """The frozen CLIP a detector runs on (baselines: `.backbone`; AnomalyCLIP: `.model.backbone`)."""
    for candidate in (getattr(detector, "backbone", None), getattr(getattr(detector, "model", None), "backbone", None)):
        if isinstance(candidate, ClipBackbone):
            return candidate
    return None


class FewShotDetector:
    """Any Detector plus a bank of normal references (see the module docstring for the combination)."""

    def __init__(self, base: Detector, bank: ReferenceBank, extractor: PatchFeatureExtractor, *,
                 zero_shot_weight: float = 0.5, sigma: float = 4.0) -> None:
        if extractor.image_size != base.image_size:
            raise ReferencesError(
                f"references use image size {extractor.image_size}, the detector {base.image_size}"
            )
        if not 0.0 <= zero_shot_weight <= 1.0:
            raise ValueError(f"zero_shot_weight {zero_shot_weight} must be between 0 and 1")
        bank.check_compatible(extractor, "reference bank")
        self.base = base
        self.extractor = extractor
        self.backbone = extractor.backbone
        self.device = base.device
        self.bank = bank.to(self.device)
        self.name = base.name
        self.image_size = base.image_size
        self.dtype = getattr(base, "dtype", torch.float32)
        self.zero_shot_weight = float(zero_shot_weight)
        self.sigma = sigma
        self.version = f"{base.version}+ref-{bank.digest or 'bank'}-k{bank.n_references}"
        extractor.backbone.clip.to(self.device)

    @torch.no_grad()
    def few_shot_maps(self, images: torch.Tensor) -> torch.Tensor:
        """(B, S, S) few-shot maps in [0, 1] (before blurring, values are (1 - max cos) / 2)."""
        images = images.to(self.device, non_blocking=True)
        with autocast(self.device, self.dtype):
            queries = self.extractor(images)
        distances = self.bank.distances([q.float() for q in queries])
        grid = self.extractor.grid
        upsampled = F.interpolate(distances.reshape(-1, 1, grid, grid), size=(self.image_size, self.image_size),
                                  mode="bilinear", align_corners=False)[:, 0]
        return gaussian_blur(upsampled, self.sigma)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_names: Sequence[str] | None = None) -> Prediction:
        zero_shot = self.base.predict(images, class_names)
        few_shot = self.few_shot_maps(images)
        w = self.zero_shot_weight
        maps = w * zero_shot.maps.to(few_shot.device) + (1.0 - w) * few_shot
        scores = w * zero_shot.scores.to(few_shot.device) + (1.0 - w) * few_shot.flatten(1).amax(dim=1)
        return Prediction(scores=scores.float(), maps=maps.float())


def with_references(
    detector: Detector,
    references: str | Path | Sequence[str | Path],
    *,
    cache_path: str | Path | None = None,
    backbone: ClipBackbone | None = None,
    layers: Sequence[int] | None = None,
    kind: str = "proj",
    zero_shot_weight: float = 0.5,
    transform: Callable[[Path, int], torch.Tensor] | None = None,
    max_references: int = MAX_REFERENCES,
) -> FewShotDetector:
    """Wrap `detector` with few-shot references: a folder or files of known-good images, or a saved bank.

    The features come from `backbone` (default: the detector's own CLIP, so nothing is loaded twice)."""
    backbone = backbone or detector_backbone(detector)
    if backbone is None:
        raise ReferencesError(
            f"detector {detector.name!r} exposes no CLIP backbone for reference features: pass backbone="
        )
    extractor = PatchFeatureExtractor(backbone, detector.image_size, layers, kind)
    backbone.clip.to(detector.device)
    bank = load_or_build_bank(references, extractor, cache_path=cache_path, transform=transform,
                              max_references=max_references)
    return FewShotDetector(detector, bank, extractor, zero_shot_weight=zero_shot_weight)


# -- calibration -------------------------------------------------------------------------------------------------

def _batches(images: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images.unsqueeze(0)
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size]
        return
    pending: list[torch.Tensor] = []
    for item in images:
        if item.ndim == 4:
            if pending:
                yield torch.stack(pending)
                pending = []
            yield item
            continue
        pending.append(item)
        if len(pending) == batch_size:
            yield torch.stack(pending)
            pending = []
    if pending:
        yield torch.stack(pending)


def calibrate_threshold(
    detector: Detector,
    good_images: torch.Tensor | Iterable[torch.Tensor],
    *,
    method: str = "quantile",
    quantile: float = 0.99,
    margin: float = 0.0,
    class_name: str | None = None,
    batch_size: int = 8,
) -> float:
    """An alert threshold from known-good images: the `quantile` of their image scores ("quantile", linear
    interpolation) or their maximum ("max"), plus `margin`. `good_images`: (N, 3, S, S), or an iterable of
    (3, S, S) images or (B, 3, S, S) batches, preprocessed for the detector."""
    if method not in ("quantile", "max"):
        raise ValueError(f"calibration method {method!r} is not one of quantile, max")
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile {quantile} must be in (0, 1]")
    scores = []
    for batch in _batches(good_images, batch_size):
        names = [class_name] * batch.shape[0] if class_name else None
        scores.append(detector.predict(batch, names).scores.detach().float().cpu())
    if not scores:
        raise ValueError("no known-good images to calibrate on")
    values = torch.cat(scores).numpy().astype(np.float64)
    base = float(values.max()) if method == "max" else float(np.quantile(values, quantile))
    return base + float(margin)
