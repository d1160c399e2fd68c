"""Per-source normal references in the daemon: banks, routing, rebuilds, calibration, operator file management.

A source's references are the images of its own folder (`[[sources]].references`, else the managed folder
`<[storage].dir>/references/<source id>` where the API/CLI put the frames operators pick), plus the
`[model].references` folder when the source names none, plus, with `references_from = "labels"`, the newest
frames of that source labelled normal (capped at `max_references`, newest first).

At start `ReferenceManager.route(base)` builds one detector per source that has references (CLIP models: the
few-shot wrapper `model.fewshot.with_references` on the shared base; `patchcore`: its own bank), logging a
progress line per source, and returns a `RoutedDetector` the model worker runs: each frame goes to its source's
detector, every output on the daemon's 0–1 scale (daemon/scale.py). Banks are stored per source
(`<[storage].dir>/references/banks/<source id>.safetensors`, with the digest of the files) and rebuilt when the
files change: a polling thread notices, builds the new detector off the inspection path and swaps a new
RoutedDetector in between two batches (the worker's `swap_detector`), so no frame is dropped.

Calibration: after building a source's detector the manager sets both thresholds from the target false-reject
rate `[model].false_reject_rate` — image threshold = the (1 - rate) quantile of known-good image scores, pixel
threshold = the same quantile of their maps' maxima — on known-good frames the bank has not seen: up to
`CALIBRATION_HOLDOUTS` references each scored by a bank of the others, for PatchCore also 8 lightly perturbed
views of each (shifted 2 % each way, turned ±5°, exposed ±5 %: live frames vary like that and the references
alone understate it; `calibration_views`), plus that source's frames labelled normal. The bound is
`upper_bound` (the empirical quantile or a Student-t bound on the logits, whichever is higher), shared with
`anomalyd calibrate --false-reject-rate`, which scores real known-good frames instead.
They are stored per source **and model version** (table `source_thresholds`; the version a source's frames
carry includes the reference digest), so a new version or reference set never keeps a stale threshold.

Bad input — an empty, missing or unreadable folder, references of mixed size or channel count, a bank of
another model, `patchcore` without references — is an error naming the value; that source's frames are
rejected with it (a `rejected_frames` record) while the other sources keep being inspected.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from daemon.scale import scale_outputs, scaled
from model.factory import needs_references
from model.preprocess import IMAGE_SUFFIXES

log = logging.getLogger("anomalyd.references")

MAX_REFERENCES = 16
CALIBRATION_HOLDOUTS = 8
# PatchCore's distance scale when it cannot be measured (one reference, a saved bank): a typical leave-one-out
# image score of EfficientNet-Lite0 at 256 px on the shared samples (cubes: 15-27).
DEFAULT_DISTANCE_SCALE = 20.0
LABELLED_NORMALS_FOR_CALIBRATION = 32
REFERENCE_PREFIX = "ref-"


class ReferenceSetupError(ValueError):
    """References that cannot be used; the message names the source and the value."""


# --- which files -------------------------------------------------------------------------------------------------


def _configured(settings: Any, source_id: str) -> Any | None:
    for cfg in settings.sources:
        if cfg.id == source_id:
            return cfg
    return None


def own_reference_dir(settings: Any, source_id: str) -> Path:
    """Where a source's added references go: its `references` folder, else the managed folder."""
    cfg = _configured(settings, source_id)
    if cfg is not None and cfg.references:
        return settings.resolve(cfg.references)
    return settings.resolve(settings.storage.dir) / "references" / source_id


def bank_path(settings: Any, source_id: str) -> Path:
    return settings.resolve(settings.storage.dir) / "references" / "banks" / f"{source_id}.safetensors"


def _images_in(folder: Path, *, required: bool, what: str) -> list[Path]:
    if folder.suffix == ".safetensors":  # a saved bank
        if not folder.is_file():
            raise ReferenceSetupError(f"{what} {folder}: no such reference bank file")
        return [folder]
    if not folder.exists():
        if required:
            raise ReferenceSetupError(f"{what} {folder}: no such folder")
        return []
    if not folder.is_dir():
        raise ReferenceSetupError(f"{what} {folder}: not a folder")
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as exc:
        raise ReferenceSetupError(f"{what} {folder}: cannot list it ({exc.strerror or exc})") from exc
    if required and not files:
        raise ReferenceSetupError(f"{what} {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def labelled_normal_frames(sessions: Any, store: Any, source_id: str, limit: int) -> list[Path]:
    """Frames of `source_id` whose newest label is normal, newest label first (at most `limit`)."""
    if sessions is None or store is None or limit <= 0:
        return []
    from sqlalchemy import select

    from adapters.db import Inspection
    from adapters.db.repository import latest_label_subquery

    newest = latest_label_subquery()
    query = (select(Inspection.frame_path, Inspection.id).where(Inspection.source == source_id,
                                                                Inspection.frame_path.is_not(None),
                                                                newest == "normal")
             .order_by(Inspection.id.desc())
             .limit(limit))
    with sessions() as session:
        rows = session.execute(query).all()
    files = []
    for relative, _ in rows:
        try:
            path = store.path(relative)
        except ValueError:
            continue
        if path.is_file():
            files.append(path)
    return files


_CAPPED_LOGGED: set[tuple[str, int]] = set()


def reference_files(settings: Any, source_id: str, sessions: Any = None, store: Any = None,
                    max_references: int = MAX_REFERENCES) -> tuple[list[Path], bool]:
    """(files, configured): the source's reference files, and whether references were asked for at all."""
    cfg = _configured(settings, source_id)
    own = cfg.references if cfg is not None else None
    files: list[Path] = []
    if own:
        files += _images_in(settings.resolve(own), required=True, what=f"source {source_id}: references")
    else:
        files += _images_in(own_reference_dir(settings, source_id), required=False, what="managed references")
        if settings.model.references:
            files += _images_in(settings.resolve(settings.model.references), required=True,
                                what=f"source {source_id}: [model].references")
    from_labels = cfg is not None and cfg.references_from == "labels"
    if from_labels and len(files) < max_references:
        files += labelled_normal_frames(sessions, store, source_id, max_references - len(files))
    configured = bool(own or settings.model.references or from_labels)
    if len(files) > max_references and not any(f.suffix == ".safetensors" for f in files):
        # The reference poll re-reads the folders every few seconds: say it once per source and count.
        level = logging.DEBUG if (source_id, len(files)) in _CAPPED_LOGGED else logging.WARNING
        _CAPPED_LOGGED.add((source_id, len(files)))
        log.log(level, "source %s: %d reference images, using the %d newest", source_id, len(files), max_references)
        files = sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)[:max_references]
    return files, configured


def signature(files: Sequence[Path]) -> tuple[tuple[str, int, int], ...]:
    """What changes when a reference file is added, removed or rewritten."""
    out = []
    for path in files:
        try:
            stat = path.stat()
        except OSError:
            continue
        out.append((str(path), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(out))


def check_images(files: Sequence[Path], source_id: str) -> tuple[int, int, int] | None:
    """All references readable and of one size and channel count; (height, width, channels) of the set."""
    import cv2

    shape: tuple[int, int, int] | None = None
    first: Path | None = None
    for path in files:
        if path.suffix == ".safetensors":
            continue
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is None or image.size == 0:
            raise ReferenceSetupError(f"source {source_id}: reference {path} is not a readable image")
        this = (image.shape[0], image.shape[1], 1 if image.ndim == 2 else image.shape[2])
        if shape is None:
            shape, first = this, path
        elif this != shape:
            raise ReferenceSetupError(
                f"source {source_id}: reference {path.name} is {this[1]}x{this[0]} with {this[2]} channel(s), "
                f"but {first.name if first else '?'} is {shape[1]}x{shape[0]} with {shape[2]}: references of one "
                "source must come from one camera setting")
    return shape


# --- building ----------------------------------------------------------------------------------------------------


def default_builder(settings: Any, base: Any, files: Sequence[Path], cache_path: Path | None) -> Any:
    """A detector for one source: the few-shot wrapper on the (scaled) base, or PatchCore on its own bank."""
    name = str(getattr(base, "name", ""))
    if needs_references(name):
        from model import create_detector

        r = settings.runtime
        references: Any = [str(f) for f in files]
        if len(files) == 1 and files[0].suffix == ".safetensors":
            references = str(files[0])
        options = reference_model_options(settings)
        from daemon.geometry import source_geometry  # the bank is <source id>.safetensors (bank_path)

        options["geometry"] = source_geometry(settings, cache_path.stem if cache_path is not None else None)
        detector = create_detector(name, device=r.device, dtype=r.dtype, references=references,
                                   references_cache=str(cache_path) if cache_path else None, **options)
        if cache_path is not None:  # the source's own detector: its distance scale (daemon/scale.py)
            known = patchcore_known_good(detector, [f for f in files if f.suffix != ".safetensors"])
            detector.known_good = known  # raw scores of held-out references and their views, for the calibration
            detector.distance_scale = known.distance_scale
        if getattr(r, "engine", "torch") != "torch":
            detector = _on_engine(settings, detector)
        return scaled(detector)
    from model.fewshot import with_references

    references = str(files[0]) if len(files) == 1 and files[0].suffix == ".safetensors" else list(files)
    return with_references(scaled(base), references, cache_path=cache_path)


def _on_engine(settings: Any, detector: Any) -> Any:
    """The source's PatchCore detector exported (parity-checked; its bank is in the graph) and run by
    [runtime].engine, keeping what the calibration and the scale read from the PyTorch one."""
    from daemon.engines import with_engine

    exported = with_engine(settings, detector)
    for name in ("known_good", "distance_scale", "bank"):
        if hasattr(detector, name):
            setattr(exported, name, getattr(detector, name))
    return exported


def reference_model_options(settings: Any) -> dict[str, Any]:
    """[model] options for a model built on references only (PatchCore): the keys the config file sets (the
    [model] defaults are the CLIP models', e.g. backbone ViT-L-14-336 and image size 518)."""
    m = settings.model
    given = m.model_fields_set
    options: dict[str, Any] = {}
    if "backbone" in given:
        options["backbone"] = settings.resolve_model_value(m.backbone)
    if "layers" in given:
        options["layers"] = tuple(m.layers)
    if "image_size" in given:
        options["image_size"] = m.image_size
    if m.max_bank_rows is not None:
        options["max_bank_rows"] = m.max_bank_rows
    if m.augment is not None:
        options["augment"] = m.augment
    return options


def patchcore_embeddings(detector: Any, files: Sequence[Path]) -> list[Any]:
    """PatchCore patch embeddings (1, D, h, w) of image files through the daemon's preprocessing."""
    import torch

    from model.patchcore import clip_to_tf
    from model.preprocess import decode_image, fast_transform

    size = int(detector.image_size)
    with torch.inference_mode():
        return [detector.model.embed(clip_to_tf(fast_transform(decode_image(f), size)[None].to(detector.device)
                                                .float())).float() for f in files]


# Known-good views for the calibration: live frames of a fixed camera differ from the references by small shifts,
# turns and exposure changes that the leave-one-out scores of the references alone do not show, so each held-out
# reference is also scored shifted by CALIBRATION_SHIFT of its size each way along each axis, turned by
# ±CALIBRATION_DEGREES and CALIBRATION_GAIN brighter and darker (bench/calibration_patchcore.py measures the rule).
CALIBRATION_SHIFT = 0.02
CALIBRATION_DEGREES = 5.0
CALIBRATION_GAIN = 0.05


def calibration_views(rgb: np.ndarray, *, shift: float = CALIBRATION_SHIFT, degrees: float = CALIBRATION_DEGREES,
                      gain: float = CALIBRATION_GAIN) -> list[np.ndarray]:
    """Lightly perturbed copies of an RGB frame (H, W, 3): 4 shifts, 2 turns (reflected borders), 2 exposures."""
    import cv2

    height, width = rgb.shape[:2]
    views = []
    for dx, dy in ((shift, 0.0), (-shift, 0.0), (0.0, shift), (0.0, -shift)):
        matrix = np.float32([[1, 0, dx * width], [0, 1, dy * height]])
        views.append(cv2.warpAffine(rgb, matrix, (width, height), borderMode=cv2.BORDER_REFLECT_101))
    for angle in (degrees, -degrees):
        matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
        views.append(cv2.warpAffine(rgb, matrix, (width, height), borderMode=cv2.BORDER_REFLECT_101))
    for factor in (1 + gain, 1 - gain):
        views.append(np.clip(np.rint(rgb.astype(np.float32) * factor), 0, 255).astype(np.uint8))
    return views


@dataclass
class KnownGoodScores:
    """Raw PatchCore scores of known-good frames the bank has not seen: held-out references (each against a bank
    of the others) and their calibration views. `distance_scale` is the median of the held-out references' own
    image scores (d0 of daemon/scale.py; the views do not move it)."""

    scores: list[float]
    maxima: list[float]
    distance_scale: float
    held_out: int
    views: int
    own: list[float] = field(default_factory=list)  # the held-out references' own image scores (no views)

    def describe(self) -> str:
        text = f"leave-one-out on {self.held_out} references"
        return text + (f" and {self.views} shifted/turned/exposed views of them" if self.views else "")


def patchcore_bank_rows(detector: Any, files: Sequence[Path], embeddings: Sequence[Any]) -> list[Any]:
    """Per reference the memory-bank rows it gives the live bank: its patches, with its augmented views when the
    detector augments references ([model].augment)."""
    import torch

    from model.patchcore import augment_references, clip_to_tf
    from model.preprocess import decode_image, fast_transform

    model, augment = detector.model, str(getattr(detector, "augment", "none"))
    if augment == "none":
        return [model.flatten(e) for e in embeddings]
    size = int(detector.image_size)
    with torch.inference_mode():
        return [model.flatten(model.embed(clip_to_tf(augment_references(
            fast_transform(decode_image(f), size)[None].to(detector.device).float(), augment))).float())
            for f in files]


def leave_one_out_scores(model: Any, embeddings: Sequence[Any], image_size: int,
                         limit: int = CALIBRATION_HOLDOUTS, views: Sequence[Any] | None = None,
                         bank_rows: Sequence[Any] | None = None) -> tuple[list[float], list[float]]:
    """Raw PatchCore (image score, map maximum) of up to `limit` reference embeddings, each against a bank of the
    other references' rows (`bank_rows[j]`, default their patches; no coreset), then of `views[i]` (V, 3, S, S
    daemon-normalised images, views of reference i) against the same bank. The model's own bank is restored.
    Empty with fewer than two."""
    import torch

    from model.patchcore import clip_to_tf

    if len(embeddings) < 2:
        return [], []
    saved = (model.memory_bank, model.bank_norms)
    scores: list[float] = []
    maxima: list[float] = []
    try:
        with torch.inference_mode():
            flats = list(bank_rows) if bank_rows is not None else [model.flatten(e) for e in embeddings]
            for held_out in range(min(limit, len(embeddings))):
                model.set_memory_bank(torch.cat([f for j, f in enumerate(flats) if j != held_out]))
                batches = [embeddings[held_out]]
                if views is not None and len(views[held_out]):
                    device = embeddings[held_out].device
                    batches.append(model.embed(clip_to_tf(views[held_out].to(device).float())).float())
                for embedding in batches:
                    patch, where, flat = model.patch_scores(embedding)
                    scores += model.image_scores(patch, where, flat).tolist()
                    maps = model.anomaly_maps(patch, tuple(embedding.shape[-2:]), (image_size, image_size))
                    maxima += maps.flatten(1).amax(1).tolist()
    finally:
        model.memory_bank, model.bank_norms = saved
    return scores, maxima


def patchcore_known_good(detector: Any, files: Sequence[Path], limit: int = CALIBRATION_HOLDOUTS,
                         embeddings: Sequence[Any] | None = None) -> KnownGoodScores:
    """Leave-one-out scores of up to `limit` references and of their calibration views (`calibration_views`):
    one embedding pass over the references instead of a bank per held-out one. `embeddings` (one per file, as
    `patchcore_embeddings` gives) saves that pass when the caller has them. Empty with fewer than two files."""
    import torch

    from model.preprocess import decode_image, fast_transform

    if len(files) < 2:
        return KnownGoodScores([], [], DEFAULT_DISTANCE_SCALE, 0, 0)
    if getattr(detector, "geometry", None) is not None and not detector.geometry.plain:
        from daemon.geometry import geometry_known_good  # fit / tile / ROI: through the same geometry

        return geometry_known_good(detector, files, limit)
    size = int(detector.image_size)
    if embeddings is None:
        embeddings = patchcore_embeddings(detector, files)
    held_out = min(limit, len(files))
    # the bank holds the other references as the live bank does: with their augmented views
    rows = patchcore_bank_rows(detector, files, embeddings)
    views = [torch.stack([fast_transform(v, size) for v in calibration_views(decode_image(f))])
             for f in files[:held_out]]
    scores, maxima = leave_one_out_scores(detector.model, embeddings, size, limit, views, rows)
    # per held-out reference its own score comes first, then its views' scores
    firsts = np.cumsum([0] + [1 + len(v) for v in views[:-1]])
    own = [scores[i] for i in firsts]
    return KnownGoodScores(scores, maxima, float(np.median(own)), held_out, sum(len(v) for v in views), own)


Builder = Callable[[Any, Any, Sequence[Path], Path | None], Any]


class NeedsReferences:
    """The base of a model that only works with references (PatchCore): names and sizes, no predictions."""

    def __init__(self, name: str, version: str, image_size: int, device: Any = "cpu") -> None:
        self.name, self.version, self.image_size, self.device = name, version, int(image_size), device

    def predict(self, images: Any, class_names: Any = None) -> Any:
        raise ReferenceSetupError(f"{self.name} needs references: set [[sources]].references or "
                                  "[model].references to a folder of known-good images")


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
        scored from them (daemon/geometry.py), its maps in the frame's pixels (`maps` is then a list)."""
        import torch

        groups: dict[int, tuple[Any, list[int]]] = {}
        for index, source_id in enumerate(source_ids):
            detector = self.per_source.get(source_id, self.base)
            groups.setdefault(id(detector), (detector, []))[1].append(index)
        versions = [self.version_for(source_id) for source_id in source_ids]
        if frames is not None and any(not getattr(getattr(d, "geometry", None), "plain", True)
                                      for d, _ in groups.values()):
            from daemon.geometry import predict_routed_frames

            return predict_routed_frames(list(groups.values()), images, class_names, frames), versions
        if len(groups) == 1:
            detector = next(iter(groups.values()))[0]
            return detector.predict(images, class_names), versions
        scores = torch.empty(len(source_ids), dtype=torch.float32)
        maps: torch.Tensor | None = None
        prediction: Any = None
        for detector, indices in groups.values():
            names = [class_names[i] for i in indices] if class_names else None
            prediction = detector.predict(images[indices], names)
            if maps is None:
                maps = torch.empty((len(source_ids), *prediction.maps.shape[1:]), dtype=torch.float32)
            index = torch.tensor(indices)
            scores[index] = prediction.scores.detach().float().cpu()
            maps[index] = prediction.maps.detach().float().cpu()
        return type(prediction)(scores=scores, maps=maps), versions


@dataclass
class SourceState:
    """What the manager knows about one source's references."""

    source_id: str
    files: list[Path] = field(default_factory=list)
    signature: tuple = ()
    detector: Any = None
    version: str | None = None
    error: str | None = None
    built_at: float | None = None
    shape: tuple[int, int, int] | None = None
    base_version: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source_id, "references": len(self.files), "version": self.version,
                "error": self.error, "image_shape": list(self.shape) if self.shape else None}


def upper_bound(values: Sequence[float], false_reject_rate: float) -> float:
    """A 0–1 threshold that known-good values exceed with probability `false_reject_rate`.

    A few dozen frames cannot show a 0.5 % quantile, so besides the empirical (1 - rate) quantile this takes a
    Student-t prediction bound on the values' logits, mean + t(1 - rate, n - 1) · sd · sqrt(1 + 1/n) (normal
    logits, n frames), and returns the larger of the two (the empirical quantile alone with under 3 frames)."""
    from scipy import stats

    data = np.clip(np.asarray(values, np.float64), 1e-6, 1 - 1e-6)
    empirical = float(np.quantile(data, 1.0 - false_reject_rate))
    if data.size < 3:
        return empirical
    logits = np.log(data / (1 - data))
    spread = float(logits.std(ddof=1)) * np.sqrt(1 + 1 / data.size)
    bound = float(logits.mean() + stats.t.ppf(1.0 - false_reject_rate, data.size - 1) * spread)
    return max(empirical, float(1 / (1 + np.exp(-bound))))


def quantile_thresholds(scores: Sequence[float], map_maxima: Sequence[float], false_reject_rate: float
                        ) -> tuple[float, float]:
    """(image threshold, pixel threshold) for known-good image scores and map maxima (see `upper_bound`)."""
    image = upper_bound(scores, false_reject_rate)
    pixel = upper_bound(map_maxima, false_reject_rate)
    # Just above the bound: a known-good frame scoring exactly the threshold is not alerted.
    return min(1.0, image + 1e-6), min(1.0, pixel + 1e-6)


def store_thresholds(sessions: Any, *, source: str, model_version: str, threshold: float, pixel_threshold: float,
                     false_reject_rate: float, n_frames: int, method: str) -> None:
    """Insert or replace the (source, model version) calibration row."""
    from sqlalchemy import select

    from adapters.db import SourceThreshold, utcnow

    with sessions() as session, session.begin():
        row = session.scalars(select(SourceThreshold).where(SourceThreshold.source == source,
                                                            SourceThreshold.model_version == model_version)
                              ).one_or_none()
        if row is None:
            row = SourceThreshold(source=source, model_version=model_version)
            session.add(row)
        row.threshold, row.pixel_threshold = float(threshold), float(pixel_threshold)
        row.false_reject_rate, row.n_frames, row.method = float(false_reject_rate), int(n_frames), method
        row.created_at = utcnow()


def load_thresholds(sessions: Any) -> dict[tuple[str, str], tuple[float, float]]:
    from sqlalchemy import select

    from adapters.db import SourceThreshold

    with sessions() as session:
        return {(row.source, row.model_version): (row.threshold, row.pixel_threshold)
                for row in session.scalars(select(SourceThreshold))}


def score_files(detector: Any, files: Sequence[Path], class_name: str | None = None, batch_size: int = 8
                ) -> tuple[list[float], list[float]]:
    """(image scores, map maxima) of image files through the daemon's preprocessing."""
    import torch

    from model.preprocess import decode_image, fast_transform

    geometry = getattr(detector, "geometry", None)
    if geometry is not None and not geometry.plain:
        from daemon.geometry import score_frames

        return score_frames(detector, files, geometry)
    scores: list[float] = []
    maxima: list[float] = []
    size = int(detector.image_size)
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        images = torch.stack([fast_transform(decode_image(path), size) for path in chunk])
        with torch.inference_mode():
            prediction = detector.predict(images, [class_name] * len(chunk) if class_name else None)
        scores += prediction.scores.detach().float().cpu().reshape(-1).tolist()
        maxima += prediction.maps.detach().float().cpu().flatten(1).amax(dim=1).tolist()
    return scores, maxima


class ReferenceManager:
    """Builds, rebuilds and calibrates the per-source reference detectors; see the module docstring."""

    def __init__(self, settings: Any, sessions: Any = None, store: Any = None, *, builder: Builder | None = None,
                 source_ids: Sequence[str] | None = None, poll_s: float = 5.0,
                 max_references: int = MAX_REFERENCES, auto_calibrate: bool = True) -> None:
        self.settings = settings
        self.auto_calibrate = auto_calibrate
        self.sessions = sessions
        self.store = store
        self.builder = builder or (lambda base, files, cache: default_builder(settings, base, files, cache))
        self.source_ids = list(source_ids if source_ids is not None else [s.id for s in settings.sources])
        self.poll_s = poll_s
        self.max_references = max_references
        self.states: dict[str, SourceState] = {sid: SourceState(sid) for sid in self.source_ids}
        self.thresholds: dict[tuple[str, str], tuple[float, float]] = {}
        self.unavailable: dict[str, str] = {}
        self._base: Any = None
        self._swap: Callable[[Any], Any] | None = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # --- building ---------------------------------------------------------------------------------------------

    def route(self, base: Any) -> RoutedDetector:
        """Per-source detectors for `base` (built now, with a progress line each) behind one RoutedDetector."""
        with self._lock:
            self._base = base
            for index, source_id in enumerate(self.source_ids, start=1):
                self._build(source_id, progress=f"{index}/{len(self.source_ids)}")
            self.refresh_thresholds()
            return self._routed()

    def _routed(self) -> RoutedDetector:
        per_source = {sid: st.detector for sid, st in self.states.items() if st.detector is not None}
        return RoutedDetector(self._base, per_source)

    def _needs_references(self) -> bool:
        return needs_references(str(getattr(self._base, "name", "")))

    def _build(self, source_id: str, progress: str = "", retry: bool = True) -> bool:
        """(Re)build one source's detector when its files changed; True when something changed."""
        state = self.states[source_id]
        try:
            files, configured = reference_files(self.settings, source_id, self.sessions, self.store,
                                                self.max_references)
        except ReferenceSetupError as exc:
            return self._failed(state, str(exc), ())
        sig = signature(files)
        base_version = str(getattr(self._base, "version", ""))
        if sig == state.signature and state.built_at is not None and state.error is None \
                and state.base_version == base_version:
            return False
        state.signature = sig
        state.files = files
        state.base_version = base_version
        if not files:
            state.detector, state.version, state.built_at = None, None, time.time()
            if self._needs_references() or configured:
                why = (f"{self._base.name} needs references" if self._needs_references()
                       else "no references yet")
                message = (f"source {source_id}: {why}: set [[sources]].references or [model].references to a "
                           "folder of known-good images, or label normal frames (references_from = \"labels\")")
                if self._needs_references():
                    return self._failed(state, message, sig)
                log.info("%s; inspecting zero-shot meanwhile", message)
            self.unavailable.pop(source_id, None)
            state.error = None
            return True
        started = time.monotonic()
        log.info("source %s: building the reference bank from %d images%s ...", source_id, len(files),
                 f" ({progress} sources)" if progress else "")
        try:
            state.shape = check_images(files, source_id)
            detector = self.builder(self._base, files, bank_path(self.settings, source_id))
        except Exception as exc:  # ReferencesError, ReferenceSetupError, decode errors: name the value, go on
            if retry and self._files_changed(source_id, sig):  # a file added/removed during the build
                return self._build(source_id, progress, retry=False)
            return self._failed(state, str(exc) if str(source_id) in str(exc) else f"source {source_id}: {exc}", sig)
        state.detector, state.version = detector, str(getattr(detector, "version", ""))
        state.error, state.built_at = None, time.time()
        self.unavailable.pop(source_id, None)
        log.info("source %s: reference bank of %d images ready in %.1f s (version %s)", source_id, len(files),
                 time.monotonic() - started, state.version)
        try:
            if self.auto_calibrate:
                self.calibrate(source_id)
        except Exception:
            log.exception("source %s: calibration failed; keeping the configured thresholds", source_id)
        return True

    def _files_changed(self, source_id: str, sig: tuple) -> bool:
        try:
            files, _ = reference_files(self.settings, source_id, self.sessions, self.store, self.max_references)
        except ReferenceSetupError:
            return False
        return signature(files) != sig

    def _failed(self, state: SourceState, message: str, sig: tuple) -> bool:
        changed = state.error != message
        state.signature, state.error, state.detector, state.version = sig, message, None, None
        state.built_at = time.time()
        if changed:
            log.error("%s; its frames are rejected until this is fixed (other sources go on)", message)
        self.unavailable[state.source_id] = message
        return changed

    # --- calibration ------------------------------------------------------------------------------------------

    def calibrate(self, source_id: str, *, force: bool = False) -> tuple[float, float] | None:
        """Both thresholds of a source's detector from known-good frames (see the module docstring)."""
        rate = float(self.settings.model.false_reject_rate)
        state = self.states[source_id]
        if rate <= 0 or state.detector is None or self.sessions is None:
            return None
        key = (source_id, str(state.version))
        if key in self.thresholds and not force:
            return self.thresholds[key]
        cfg = _configured(self.settings, source_id)
        class_name = (cfg.class_name if cfg is not None else None) or self.settings.model.class_name
        images = [f for f in state.files if f.suffix != ".safetensors"]
        scores: list[float] = []
        maxima: list[float] = []
        methods = []
        known = getattr(state.detector, "known_good", None)
        if known is not None and known.scores:  # PatchCore: raw scores from the build, put on the 0-1 scale
            import torch

            raw_scores, raw_maxima = (torch.tensor(v, dtype=torch.float32) for v in (known.scores, known.maxima))
            s, m = scale_outputs(state.detector, raw_scores, raw_maxima)
            scores += s.tolist()
            maxima += m.tolist()
            methods.append(known.describe())
        elif len(images) >= 2:
            for held_out in images[:CALIBRATION_HOLDOUTS]:
                others = [f for f in images if f != held_out]
                detector = self.builder(self._base, others, None)
                if getattr(state.detector, "distance_scale", None) is not None:  # one scale for every bank
                    detector.distance_scale = state.detector.distance_scale
                s, m = score_files(detector, [held_out], class_name)
                scores += s
                maxima += m
            methods.append(f"leave-one-out on {min(len(images), CALIBRATION_HOLDOUTS)} references")
        normals = [f for f in labelled_normal_frames(self.sessions, self.store, source_id,
                                                     LABELLED_NORMALS_FOR_CALIBRATION) if f not in set(images)]
        if normals:
            s, m = score_files(state.detector, normals, class_name)
            scores += s
            maxima += m
            methods.append(f"{len(normals)} labelled normals")
        if not scores:
            log.info("source %s: too few known-good frames to calibrate (%d reference); keeping the configured "
                     "thresholds", source_id, len(images))
            return None
        threshold, pixel = quantile_thresholds(scores, maxima, rate)
        store_thresholds(self.sessions, source=source_id, model_version=str(state.version), threshold=threshold,
                         pixel_threshold=pixel, false_reject_rate=rate, n_frames=len(scores),
                         method="; ".join(methods))
        self.thresholds[key] = (threshold, pixel)
        log.info("source %s: thresholds calibrated to a %.2f%% false-reject rate on %d known-good frames "
                 "(%s): image %.4f, pixel %.4f", source_id, 100 * rate, len(scores), "; ".join(methods),
                 threshold, pixel)
        return threshold, pixel

    def refresh_thresholds(self) -> None:
        if self.sessions is None:
            return
        try:
            self.thresholds.update(load_thresholds(self.sessions))
        except Exception as exc:  # database briefly unreachable: keep what we have
            log.warning("cannot read calibrated thresholds: %s", str(exc).splitlines()[0][:200])

    # --- watching ---------------------------------------------------------------------------------------------

    def start(self, swap: Callable[[Any], Any]) -> None:
        """Poll the reference files; swap in a new RoutedDetector (between batches) when a bank was rebuilt."""
        self._swap = swap
        self._thread = threading.Thread(target=self._loop, name="references", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        """Check the files now (after the API/CLI changed them)."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.check()
            except Exception:
                log.exception("reference check failed")

    def check(self) -> bool:
        """Rebuild the sources whose files changed; True when a new detector was swapped in."""
        with self._lock:
            if self._base is None:
                return False
            changed = False
            for source_id in self.source_ids:
                changed |= self._build(source_id)
            self.refresh_thresholds()
            if changed and self._swap is not None:
                self._swap(self._routed())
            return changed

    def status(self) -> dict[str, Any]:
        return {sid: st.as_dict() for sid, st in self.states.items()}


# --- operator file management (API and CLI) ------------------------------------------------------------------------


def list_references(settings: Any, source_id: str, sessions: Any = None, store: Any = None) -> list[dict[str, Any]]:
    """The reference files of a source: name, folder, size, whether operators may remove it."""
    try:
        files, _ = reference_files(settings, source_id, sessions, store, max_references=10_000)
    except ReferenceSetupError:
        files = _images_in(own_reference_dir(settings, source_id), required=False, what="references")
    own = own_reference_dir(settings, source_id).resolve()
    out = []
    for path in files:
        try:
            size = path.stat().st_size
        except OSError:
            continue
        out.append({"name": path.name, "folder": str(path.parent), "bytes": size,
                    "removable": path.resolve().parent == own})
    return out


def add_references(settings: Any, sessions: Any, store: Any, source_id: str,
                   inspection_ids: Sequence[int]) -> tuple[list[dict[str, Any]], list[str]]:
    """Copy the frames of inspections of `source_id` into its reference folder under server-chosen names.

    Returns (added files, warnings); a frame that was itself found or labelled anomalous is added with a warning.
    Raises LookupError for an unknown inspection, ValueError for one of another source or without a frame.
    """
    from adapters.db import Inspection
    from adapters.db.repository import latest_label

    target = own_reference_dir(settings, source_id)
    added, warnings = [], []
    with sessions() as session:
        rows = []
        for inspection_id in inspection_ids:
            row = session.get(Inspection, int(inspection_id))
            if row is None:
                raise LookupError(f"no inspection {inspection_id}")
            if row.source != source_id:
                raise ValueError(f"inspection {inspection_id} is from source {row.source!r}, not {source_id!r}")
            if not row.frame_path:
                raise ValueError(f"inspection {inspection_id} has no stored frame ([storage].save_frames is off?)")
            label = latest_label(session, row.id)
            rows.append((row.id, row.frame_path, row.is_anomalous, row.score, row.threshold,
                         label.label if label is not None else None))
    target.mkdir(parents=True, exist_ok=True)
    for inspection_id, frame_path, is_anomalous, score, threshold, label in rows:
        source_file = store.path(frame_path)
        if not source_file.is_file():
            raise ValueError(f"inspection {inspection_id}: its frame file {frame_path} is gone (retention?)")
        if label == "anomalous" or (label is None and is_anomalous):
            why = "labelled anomalous" if label == "anomalous" else f"scored {score:.3f} >= threshold {threshold:.3f}"
            warnings.append(f"inspection {inspection_id} was {why}: a defective reference hides that defect")
        name = f"{REFERENCE_PREFIX}{inspection_id}-{uuid.uuid4().hex[:8]}{source_file.suffix.lower() or '.jpg'}"
        tmp = target / f".{name}.tmp"
        shutil.copyfile(source_file, tmp)
        tmp.replace(target / name)
        added.append({"name": name, "inspection_id": inspection_id, "folder": str(target)})
    for warning in warnings:
        log.warning("source %s: %s", source_id, warning)
    return added, warnings


def remove_reference(settings: Any, source_id: str, name: str) -> Path:
    """Delete one reference file of the source's own folder (by its name, never a path)."""
    if not name or "/" in name or "\\" in name or name.startswith(".") or Path(name).suffix.lower() \
            not in IMAGE_SUFFIXES:
        raise ValueError(f"{name!r} is not a reference file name")
    path = own_reference_dir(settings, source_id) / name
    if not path.is_file():
        raise LookupError(f"source {source_id} has no reference {name!r}")
    path.unlink()
    return path
