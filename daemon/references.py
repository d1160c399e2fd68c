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
daemon/calibration.py's (an order statistic, or an extrapolated tail with a warning when the frames are too few),
shared with `anomalyd calibrate`, which scores real known-good frames instead. They are stored per source **and model
version** (table `source_thresholds`; the version a source's frames carry includes the reference digest), so a new
version or reference set never keeps a stale threshold; a stored one is kept at restart. Every change, pins and the
labelled-defect guard: daemon/thresholds.py.

A source with `references = "auto"` and no references yet (or any source under `[model].name = "mutual"`) gets
a mutual-scoring detector with a window of its own frames instead (daemon/zero_label.py) until references arrive.

Bad input — an empty, missing or unreadable folder, references of sizes more than SIZE_TOLERANCE apart per side
(any sizes are fine under resize "fit" or "tile" without ROI or ignore polygons) or of mixed channel counts, a bank of another model, `patchcore` without references — is an error naming the
value. A source with a last good bank keeps inspecting with it (the build is retried with backoff); a source without
one is unavailable: not ready, with the cause, and its frames go back to their source (inbox, redelivery) while the
other sources keep being inspected.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from daemon.calibration import (  # noqa: F401  (re-exported: the API and commands import them from here)
    calibrated_bounds,
    load_thresholds,
    quantile_thresholds,
    store_thresholds,
    stored_threshold,
    upper_bound,
)
from daemon.known_good import (
    CALIBRATION_DEGREES,
    CALIBRATION_GAIN,
    CALIBRATION_HOLDOUTS,
    CALIBRATION_SHIFT,
    DEFAULT_DISTANCE_SCALE,
    KnownGoodScores,
    calibration_views,
    leave_one_out_scores,
)
from daemon.scale import scale_outputs, scaled
from daemon.thresholds import LABELLED_ANOMALIES_FOR_GUARD, ThresholdTable, labelled_frames, load_pins
from daemon.zero_label import AUTO, mutual_detector, zero_label
from model.factory import needs_references
from model.preprocess import IMAGE_SUFFIXES

log = logging.getLogger("anomalyd.references")

MAX_REFERENCES = 16
LABELLED_NORMALS_FOR_CALIBRATION = 32
REFERENCE_PREFIX = "ref-"
REBUILD_BACKOFF_S = 300.0  # the longest wait between retries of a failed bank build with unchanged files


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
    if cfg is not None and cfg.references and cfg.references != AUTO:
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


_CAPPED_LOGGED: set[tuple[str, int]] = set()


def reference_files(settings: Any, source_id: str, sessions: Any = None, store: Any = None,
                    max_references: int = MAX_REFERENCES) -> tuple[list[Path], bool]:
    """(files, configured): the source's reference files, and whether references were asked for at all."""
    cfg = _configured(settings, source_id)
    own = cfg.references if cfg is not None and cfg.references != AUTO else None
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
        files += labelled_frames(sessions, store, source_id, "normal", max_references - len(files))
    configured = bool(own or settings.model.references or from_labels)
    if len(files) > max_references and not any(f.suffix == ".safetensors" for f in files):
        # The reference poll re-reads the folders every few seconds: say it once per source and count.
        level = logging.DEBUG if (source_id, len(files)) in _CAPPED_LOGGED else logging.WARNING
        _CAPPED_LOGGED.add((source_id, len(files)))
        log.log(level, "source %s: %d reference images, using the %d newest", source_id, len(files), max_references)
        files = sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)[:max_references]
    return files, configured


def source_signature(settings: Any, source_id: str, files: Sequence[Path]) -> tuple[tuple[str, int, int], ...]:
    """`signature` of the files plus the source's geometry override file (daemon/geometry_overrides.py): setting
    or resetting a geometry rebuilds the bank as a change of reference files does."""
    from daemon.geometry_overrides import override_path

    return signature([*files, override_path(settings, source_id)])


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


SIZE_TOLERANCE = 0.10  # frames are resized to the model's input anyway: a few pixels apart is one camera setting


def image_shape(path: Path, source_id: str) -> tuple[int, int, int]:
    """(height, width, channels) of a reference file; ReferenceSetupError when it is not a readable image."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise ReferenceSetupError(f"source {source_id}: reference {path} is not a readable image")
    return image.shape[0], image.shape[1], 1 if image.ndim == 2 else image.shape[2]


def shape_mismatch(shape: tuple[int, int, int], like: tuple[int, int, int], any_size: bool = False) -> str | None:
    """Why a reference of `shape` does not go with references of `like` (None when it does): the same channel
    count, and each side within SIZE_TOLERANCE of theirs unless `any_size` (`sizes_may_differ`)."""
    if shape[2] != like[2]:
        return f"{shape[2]} channel(s) instead of {like[2]}"
    if any_size:
        return None
    for side, (a, b) in (("height", (shape[0], like[0])), ("width", (shape[1], like[1]))):
        if abs(a - b) > SIZE_TOLERANCE * b:
            return f"its {side} {a} px is more than {100 * SIZE_TOLERANCE:g} % from {b} px"
    return None


def sizes_may_differ(settings: Any, source_id: str) -> bool:
    """Whether a source's references may be of any size: its geometry feeds each frame at its own shape ("fit",
    "tile") and points at no frame pixels (no ROI, no ignore polygon, which would land elsewhere on a frame of
    another size). "squash" stretches each size differently, so its references stay within SIZE_TOLERANCE."""
    from daemon.geometry_overrides import effective_geometry
    from model.geometry import GeometryError

    try:
        geometry = effective_geometry(settings, source_id)
    except GeometryError:
        return False  # the build says why
    return geometry.resize in ("fit", "tile") and geometry.roi is None and not geometry.ignore


def check_images(files: Sequence[Path], source_id: str, any_size: bool = False) -> tuple[int, int, int] | None:
    """All references readable, of one channel count and (unless `any_size`) of sizes within SIZE_TOLERANCE of
    the first one's per side; (height, width, channels) of the first."""
    shape: tuple[int, int, int] | None = None
    first: Path | None = None
    for path in files:
        if path.suffix == ".safetensors":
            continue
        this = image_shape(path, source_id)
        if shape is None:
            shape, first = this, path
        elif (why := shape_mismatch(this, shape, any_size)) is not None:
            raise ReferenceSetupError(
                f"source {source_id}: reference {path.name} is {this[1]}x{this[0]} with {this[2]} channel(s), "
                f"but {first.name if first else '?'} is {shape[1]}x{shape[0]} with {shape[2]} ({why}): references "
                "of one source must come from one camera setting (resize = \"fit\" or \"tile\" without roi and "
                "ignore_polygons takes references of any size)")
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
        from daemon.geometry import source_geometry
        from daemon.geometry_overrides import effective_geometry  # config, or an operator's override (API/UI)

        # the bank is <source id>.safetensors (bank_path); a held-out bank (no path) is [model]'s geometry
        options["geometry"] = (effective_geometry(settings, cache_path.stem) if cache_path is not None
                               else source_geometry(settings, None))
        if getattr(base, "head", None):  # patchcore-head: the model version's trained head (daemon/head_retraining.py)
            options["head"] = base.head
        if name == "patchcore-head":  # the head scores square frames, as it was trained (no fit/tile geometry)
            options.pop("geometry", None)
        detector = create_detector(name, device=r.device, dtype=r.dtype, references=references,
                                   references_cache=str(cache_path) if cache_path else None, **options)
        if cache_path is not None and name == "patchcore-head":  # scored through its head
            from daemon.head_known_good import head_known_good

            detector.known_good = head_known_good(detector, [f for f in files if f.suffix != ".safetensors"])
            detector.threshold_floor = True  # calibrate: at least the head's decision boundary (head_known_good.py)
            return scaled(detector)  # already 0-1; not exported to another engine yet
        if cache_path is not None:  # the source's own detector: its distance scale (daemon/scale.py)
            known = cached_known_good(settings, detector, [f for f in files if f.suffix != ".safetensors"],
                                      cache_path)
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


def cached_known_good(settings: Any, detector: Any, files: Sequence[Path], bank: Path) -> KnownGoodScores:
    """`patchcore_known_good`, read back from the source's cache when its key is unchanged (daemon/known_good_cache.py),
    with the time it took logged."""
    from daemon import known_good_cache as cache

    started = time.monotonic()
    parameters = {"shift": CALIBRATION_SHIFT, "degrees": CALIBRATION_DEGREES, "gain": CALIBRATION_GAIN,
                  "holdouts": CALIBRATION_HOLDOUTS, "files": [f.name for f in files]}
    key = cache.cache_key(settings, bank.stem, detector, parameters)
    path = cache.cache_file(bank)
    stored = cache.load(path, key)
    if stored is not None:
        known = KnownGoodScores(stored["scores"], stored["maxima"], stored["distance_scale"], stored["held_out"],
                                stored["views"], stored["own"])
        known.own_files = [f.name for f in files[:len(known.own)]]
        log.info("source %s: known-good scores of %d references read from %s in %.2f s (unchanged)", bank.stem,
                 len(files), path.name, time.monotonic() - started)
        return known
    known = patchcore_known_good(detector, files)
    known.own_files = [f.name for f in files[:len(known.own)]]
    cache.save(path, key, {"scores": known.scores, "maxima": known.maxima, "distance_scale": known.distance_scale,
                           "held_out": known.held_out, "views": known.views, "own": known.own})
    log.info("source %s: known-good scores of %d references (%s) computed in %.1f s", bank.stem, len(files),
             known.describe(), time.monotonic() - started)
    return known


Builder = Callable[[Any, Any, Sequence[Path], Path | None], Any]


class NeedsReferences:
    """The base of a model that only works with references (PatchCore): names and sizes, no predictions."""

    def __init__(self, name: str, version: str, image_size: int, device: Any = "cpu", head: str | None = None) -> None:
        self.name, self.version, self.image_size, self.device = name, version, int(image_size), device
        self.head = head  # patchcore-head: the version's trained head file (None: untrained, ranks like PatchCore)

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
        notes: list[Any] = [None] * len(source_ids)  # per-frame notes (mutual scoring's drift watch)
        for detector, indices in groups.values():
            names = [class_names[i] for i in indices] if class_names else None
            prediction = detector.predict(images[indices], names)
            if maps is None:
                maps = torch.empty((len(source_ids), *prediction.maps.shape[1:]), dtype=torch.float32)
            index = torch.tensor(indices)
            scores[index] = prediction.scores.detach().float().cpu()
            maps[index] = prediction.maps.detach().float().cpu()
            for offset, note in enumerate(getattr(prediction, "notes", None) or ()):
                notes[indices[offset]] = note
        extra = {"notes": notes} if any(note is not None for note in notes) else {}
        return type(prediction)(scores=scores, maps=maps, **extra), versions


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
    failures: int = 0  # failed builds in a row (backoff)
    retry_at: float = 0.0  # monotonic time of the next retry of a failed build with unchanged files

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source_id, "references": len(self.files), "version": self.version,
                "error": self.error, "image_shape": list(self.shape) if self.shape else None,
                "ready": self.detector is not None or self.error is None}


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
        self.thresholds: ThresholdTable = ThresholdTable()  # the result writer reads it; pins answer first
        self.listeners: list[Any] = []  # told of every threshold change (daemon/thresholds.py), once
        self._history_seen: int | None = None  # the newest threshold_history id announced
        self.unavailable: dict[str, str] = {}
        self._base: Any = None
        self._swap: Callable[[Any], Any] | None = None
        self._lock = threading.RLock()
        self._announce_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # --- building ---------------------------------------------------------------------------------------------

    def route(self, base: Any) -> RoutedDetector:
        """Per-source detectors for `base` (built now, with a progress line each) behind one RoutedDetector."""
        with self._lock:
            self._base = base
            if self._history_seen is None and self.sessions is not None:
                self._announce_changes()  # the baseline: this start's calibrations are announced below
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
        sig = source_signature(self.settings, source_id, files)
        base_version = str(getattr(self._base, "version", ""))
        if state.error is not None and sig == state.signature and state.base_version == base_version \
                and time.monotonic() < state.retry_at:
            return False  # a failed build is retried with backoff, not at every poll
        if sig == state.signature and state.built_at is not None and state.error is None \
                and state.base_version == base_version:
            return False
        state.signature = sig
        state.files = files
        state.base_version = base_version
        if zero_label(self.settings, self._base, source_id, files):
            return self._start_zero_label(state)
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
            state.shape = check_images(files, source_id, sizes_may_differ(self.settings, source_id))
            detector = self.builder(self._base, files, bank_path(self.settings, source_id))
        except Exception as exc:  # ReferencesError, ReferenceSetupError, decode errors: name the value, go on
            if retry and self._files_changed(source_id, sig):  # a file added/removed during the build
                return self._build(source_id, progress, retry=False)
            return self._failed(state, str(exc) if str(source_id) in str(exc) else f"source {source_id}: {exc}", sig)
        state.detector, state.version = detector, str(getattr(detector, "version", ""))
        state.error, state.built_at, state.failures = None, time.time(), 0
        self.unavailable.pop(source_id, None)
        log.info("source %s: reference bank of %d images ready in %.1f s (version %s)", source_id, len(files),
                 time.monotonic() - started, state.version)
        try:
            if self.auto_calibrate:
                self.calibrate(source_id)
        except Exception:
            log.exception("source %s: calibration failed; keeping the configured thresholds", source_id)
        return True

    def _start_zero_label(self, state: SourceState) -> bool:
        """No references yet on a `references = "auto"` source (or a `mutual` model): mutual scoring on the
        source's own recent frames (daemon/zero_label.py)."""
        try:
            state.detector = mutual_detector(self.settings, self._base, reference_model_options(self.settings),
                                             state.source_id)
        except Exception as exc:  # weights missing, bad options: name the value, go on with the other sources
            return self._failed(state, f"source {state.source_id}: zero-label start: {exc}", ())
        state.version, state.error, state.built_at = str(state.detector.version), None, time.time()
        self.unavailable.pop(state.source_id, None)
        log.info("source %s: no references yet: mutual scoring on its own recent frames (version %s)",
                 state.source_id, state.version)
        return True

    def _files_changed(self, source_id: str, sig: tuple) -> bool:
        try:
            files, _ = reference_files(self.settings, source_id, self.sessions, self.store, self.max_references)
        except ReferenceSetupError:
            return False
        return source_signature(self.settings, source_id, files) != sig

    def _failed(self, state: SourceState, message: str, sig: tuple) -> bool:
        """A build failed: keep inspecting with the last good bank when there is one, else the source is
        unavailable (not ready, its frames wait); retried with backoff (REBUILD_BACKOFF_S) or when files change."""
        changed = state.error != message
        state.signature, state.error, state.built_at = sig, message, time.time()
        state.failures += 1
        state.retry_at = time.monotonic() + min(REBUILD_BACKOFF_S, self.poll_s * 2 ** state.failures)
        if state.detector is not None:  # a rebuild failed: the bank that worked goes on
            if changed:
                log.error("%s; source %s keeps inspecting with its last good bank (version %s)", message,
                          state.source_id, state.version)
            return False
        state.version = None
        if changed:
            log.error("%s; its frames wait in their source until this is fixed (other sources go on)", message)
        self.unavailable[state.source_id] = message
        return changed

    # --- calibration ------------------------------------------------------------------------------------------

    def calibrate(self, source_id: str, *, force: bool = False) -> tuple[float, float] | None:
        """Both thresholds of a source's detector from known-good frames (see the module docstring). A stored
        calibration of the same model version (the reference digest is part of it) is kept unless `force`: a
        restart never replaces an operator's `anomalyd calibrate`, and skips the recomputation."""
        rate = float(self.settings.model.false_reject_rate)
        state = self.states[source_id]
        if rate <= 0 or state.detector is None or self.sessions is None:
            return None
        key = (source_id, str(state.version))
        if key in self.thresholds and not force:
            return self.thresholds[key]
        if not force:
            row = stored_threshold(self.sessions, source_id, str(state.version))
            if row is not None:
                self.thresholds[key] = (row.threshold, row.pixel_threshold)
                log.info("source %s: stored calibration of version %s kept (image %.4f, pixel %.4f, by %s)",
                         source_id, state.version, row.threshold, row.pixel_threshold, row.method)
                return self.thresholds[key]
        cfg = _configured(self.settings, source_id)
        class_name = (cfg.class_name if cfg is not None else None) or self.settings.model.class_name
        scores, maxima, methods = self._known_good(state, class_name)
        if not scores:
            log.info("source %s: too few known-good frames to calibrate (%d reference); keeping the configured "
                     "thresholds", source_id, len(state.files))
            return None
        from daemon.thresholds import Calibration, apply_calibration

        image, pixel = calibrated_bounds(scores, maxima, rate, what=f"source {source_id}")
        if getattr(state.detector, "threshold_floor", False):  # patchcore-head
            from daemon.head_known_good import floored

            image, pixel = floored(image), floored(pixel)
        anomalies = labelled_frames(self.sessions, self.store, source_id, "anomalous", LABELLED_ANOMALIES_FOR_GUARD)
        anomaly_scores = score_files(state.detector, anomalies, class_name)[0] if anomalies else []
        configured = (float(cfg.threshold), float(cfg.map_threshold)) if cfg is not None else None
        applied = apply_calibration(self.sessions, Calibration(
            source=source_id, model_version=str(state.version), threshold=image.value, pixel_threshold=pixel.value,
            rule=f"{image.rule}; known-good: {'; '.join(methods)}", false_reject_rate=rate, n_good=len(scores),
            set_by="daemon", method="; ".join(methods)), anomaly_scores=anomaly_scores, configured=configured)
        self.thresholds[key] = applied
        return applied

    def _known_good(self, state: SourceState, class_name: str | None) -> tuple[list[float], list[float], list[str]]:
        """Scores and map maxima of the known-good frames the source's bank has not seen, and what they are."""
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
        normals = [f for f in labelled_frames(self.sessions, self.store, state.source_id, "normal",
                                              LABELLED_NORMALS_FOR_CALIBRATION) if f not in set(images)]
        if normals:
            s, m = score_files(state.detector, normals, class_name)
            scores += s
            maxima += m
            methods.append(f"{len(normals)} labelled normals")
        return scores, maxima, methods

    def refresh_thresholds(self) -> None:
        if self.sessions is None:
            return
        try:
            self.thresholds.update(load_thresholds(self.sessions))
            self.thresholds.pins = load_pins(self.sessions)
            self._announce_changes()
        except Exception as exc:  # database briefly unreachable: keep what we have
            log.warning("cannot read calibrated thresholds: %s", str(exc).splitlines()[0][:200])

    def _announce_changes(self) -> None:
        """Tell the listeners (MQTT) of the history rows written since the last look, by this process or another
        (an operator's `anomalyd thresholds pin` or `calibrate`): every change is an event, once."""
        from daemon.thresholds import changes_after, latest_change_id

        with self._announce_lock:  # the API's refresh and the poll's: each row once
            self._announce_locked(changes_after, latest_change_id)

    def _announce_locked(self, changes_after: Callable[..., Any], latest_change_id: Callable[..., int]) -> None:
        if self._history_seen is None:  # the first look: what happened before this start was announced then
            self._history_seen = latest_change_id(self.sessions)
            return
        rows = changes_after(self.sessions, self._history_seen)
        if rows:
            self._history_seen = max(int(row["id"]) for row in rows)
        for row in rows:
            for listener in self.listeners:
                try:
                    listener(row)
                except Exception:
                    log.exception("threshold listener failed")

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
