"""A source's reference detector: built from its reference files, with the known-good scores its calibration
reads (held-out references and their perturbed views, from its family's `known_good` hook), and images scored the
way the daemon scores frames (`score_files`).

`default_builder` puts the few-shot wrapper (`model.fewshot.with_references`) on the shared base of a model that
takes references on top (the CLIP families), and builds a model that scores only against references
(`Capabilities.needs_references`, e.g. PatchCore) on the source's own bank, with its geometry and distance scale.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from daemon.config.model_options import reference_model_options, runtime_options
from daemon.detectors.scale import scaled
from model.checkpoints import CheckpointError
from model.factory import capabilities, get_family, known_good_of, needs_references
from model.known_good import (
    CALIBRATION_DEGREES,
    CALIBRATION_GAIN,
    CALIBRATION_HOLDOUTS,
    CALIBRATION_SHIFT,
    KnownGoodScores,
)

log = logging.getLogger("anomalyd.references")


def default_builder(settings: Any, base: Any, files: Sequence[Path], cache_path: Path | None) -> Any:
    """A detector for one source: the few-shot wrapper on the (scaled) base, or PatchCore on its own bank."""
    name = str(getattr(base, "name", ""))
    if needs_references(name):
        from model import create_detector

        references: Any = [str(f) for f in files]
        if len(files) == 1 and files[0].suffix == ".safetensors":
            references = str(files[0])
        options = reference_model_options(settings, name)
        if capabilities(name).supports_geometry:  # PatchCore, a head (trained on that resize mode); others: squares
            from daemon.config.geometry import source_geometry
            from daemon.references.geometry_overrides import effective_geometry

            # config, or an operator's override (API/UI); the bank is <source id>.safetensors (bank_path), a
            # held-out bank (no path) gets [model]'s geometry
            options["geometry"] = (effective_geometry(settings, cache_path.stem) if cache_path is not None
                                   else source_geometry(settings, None))
        if base.weights:  # the model version's learned weights (e.g. a trained head: daemon/learning/head_retraining.py)
            options["prompts"] = base.weights
        build = dict(references=references, references_cache=str(cache_path) if cache_path else None,
                     **runtime_options(settings))
        try:
            detector = create_detector(name, **options, **build)
        except CheckpointError as exc:
            if not base.weights or cache_path is None:
                raise
            # The version's weights were learned on another geometry than the source runs now (an operator changed
            # its resize): the source goes on with the family's base model on its references, recalibrated as its
            # own version, rather than stopping the line; the next retraining learns weights for it.
            del options["prompts"]
            detector = create_detector(name, **options, **build)
            detector.weights_mismatch = (f"the active version's learned weights do not fit this source ({exc}); it "
                                         f"runs {detector.version} (the base model on its references) until labels "
                                         "retrain the version for it")
            log.warning("source %s: %s", cache_path.stem, detector.weights_mismatch)
        if cache_path is not None:  # the source's own detector: its distance scale (daemon/detectors/scale.py)
            known = cached_known_good(settings, detector, [f for f in files if f.suffix != ".safetensors"],
                                      cache_path)
            if known is not None:
                detector.known_good = known  # raw scores of held-out references and their views, for the calibration
                detector.distance_scale = known.distance_scale
        if getattr(settings.runtime, "engine", "torch") != "torch" and get_family(name).exportable:  # others: torch
            detector = _on_engine(settings, detector)
        return scaled(detector)
    from model.fewshot import with_references

    references = str(files[0]) if len(files) == 1 and files[0].suffix == ".safetensors" else list(files)
    return with_references(scaled(base), references, cache_path=cache_path)


def _on_engine(settings: Any, detector: Any) -> Any:
    """The source's PatchCore detector exported (parity-checked; its bank is in the graph) and run by
    [runtime].engine, keeping what the calibration and the scale read from the PyTorch one."""
    from daemon.detectors.engines import with_engine

    exported = with_engine(settings, detector)
    for name in ("known_good", "distance_scale", "bank", "weights_mismatch"):
        if hasattr(detector, name):
            setattr(exported, name, getattr(detector, name))
    return exported


def cached_known_good(settings: Any, detector: Any, files: Sequence[Path], bank: Path) -> KnownGoodScores | None:
    """The detector family's known-good scores (its `known_good` hook, e.g. model/patchcore/known_good.py), read
    back from the source's cache when its key is unchanged (daemon/references/known_good_cache.py), with the time it took
    logged. None for a family with no such hook."""
    from daemon.references import known_good_cache as cache

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
    compute = known_good_of(detector)
    if compute is None:
        return None
    known = compute(detector, files, CALIBRATION_HOLDOUTS)
    known.own_files = [f.name for f in files[:len(known.own)]]
    cache.save(path, key, {"scores": known.scores, "maxima": known.maxima, "distance_scale": known.distance_scale,
                           "held_out": known.held_out, "views": known.views, "own": known.own})
    log.info("source %s: known-good scores of %d references (%s) computed in %.1f s", bank.stem, len(files),
             known.describe(), time.monotonic() - started)
    return known


Builder = Callable[[Any, Any, Sequence[Path], Path | None], Any]


def score_files(detector: Any, files: Sequence[Path], class_name: str | None = None, batch_size: int = 8
                ) -> tuple[list[float], list[float]]:
    """(image scores, map maxima) of image files through the daemon's preprocessing."""
    import torch

    from model.preprocess import decode_image, fast_transform

    geometry = getattr(detector, "geometry", None)
    if geometry is not None and not geometry.plain:
        from daemon.config.geometry import score_frames

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
