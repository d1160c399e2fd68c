"""Per-source normal references in the daemon: the `ReferenceManager` builds, rebuilds and calibrates each source's
detector. Which files are references: daemon/references/files.py; building a source's detector and its known-good
scores: daemon/references/bank.py; sending each frame to its source's detector: daemon/detectors/routing.py; operators' file
management: daemon/references/admin.py.

A source's references are the images of its own folder (`[[sources]].references`, else the managed folder
`<[storage].dir>/references/<source id>` where the API/CLI put the frames operators pick), plus the
`[model].references` folder when the source names none, plus, with `references_from = "labels"`, the newest
frames of that source labelled normal (capped at `max_references`, newest first).

At start `ReferenceManager.route(base)` builds one detector per source that has references (CLIP models: the
few-shot wrapper `model.fewshot.with_references` on the shared base; `patchcore`: its own bank), logging a
progress line per source, and returns a `RoutedDetector` the model worker runs: each frame goes to its source's
detector, every output on the daemon's 0–1 scale (daemon/detectors/scale.py). Banks are stored per source
(`<[storage].dir>/references/banks/<source id>.safetensors`, with the digest of the files) and rebuilt when the
files change: a polling thread notices, builds the new detector off the inspection path and swaps a new
RoutedDetector in between two batches (the worker's `swap_detector`), so no frame is dropped.

Calibration: after building a source's detector the manager sets both thresholds from the target false-reject
rate `[model].false_reject_rate` — image threshold = the (1 - rate) quantile of known-good image scores, pixel
threshold = the same quantile of their maps' maxima — on known-good frames the bank has not seen: up to
`CALIBRATION_HOLDOUTS` references each scored by a bank of the others, for PatchCore also 8 lightly perturbed
views of each (shifted 2 % each way, turned ±5°, exposed ±5 %: live frames vary like that and the references
alone understate it; `calibration_views`), plus that source's frames labelled normal. The bound is
daemon/references/calibration.py's (an order statistic, or an extrapolated tail with a warning when the frames are too few),
shared with `anomalyd calibrate`, which scores real known-good frames instead. They are stored per source **and model
version** (table `source_thresholds`; the version a source's frames carry includes the reference digest), so a new
version or reference set never keeps a stale threshold; a stored one is kept at restart. Every change, pins and the
labelled-defect guard: daemon/references/thresholds.py.

A source with `references = "auto"` and no references yet (or any source under `[model].name = "mutual"`) gets
a mutual-scoring detector with a window of its own frames instead (daemon/zero_label/start.py) until references arrive.

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

from daemon.config.model_options import reference_model_options
from daemon.detectors.routing import RoutedDetector
from daemon.detectors.scale import scale_outputs
from daemon.references.bank import Builder, default_builder, score_files
from daemon.references.calibration import calibrated_bounds, floored, load_thresholds, stored_threshold
from daemon.references.files import (
    MAX_REFERENCES,
    ReferenceSetupError,
    bank_path,
    check_images,
    configured_source,
    reference_files,
    sizes_may_differ,
    source_signature,
)
from daemon.references.thresholds import (
    LABELLED_ANOMALIES_FOR_GUARD,
    ThresholdTable,
    labelled_frames,
    load_pins,
)
from daemon.zero_label.start import scores_own_frames, version_prefix, zero_label, zero_label_detector
from model.factory import capabilities_of, needs_references, zero_label_family
from model.known_good import CALIBRATION_HOLDOUTS

log = logging.getLogger("anomalyd.references")

LABELLED_NORMALS_FOR_CALIBRATION = 32
REBUILD_BACKOFF_S = 300.0  # the longest wait between retries of a failed bank build with unchanged files


class NeedsReferences:
    """The base of a model that only works with references (PatchCore): names and sizes, no predictions."""

    def __init__(self, name: str, version: str, image_size: int, device: Any = "cpu",
                 weights: str | None = None) -> None:
        self.name, self.version, self.image_size, self.device = name, version, int(image_size), device
        self.weights = weights  # the version's learned weights file (a trained head), passed on as `prompts`

    def predict(self, images: Any, class_names: Any = None) -> Any:
        raise ReferenceSetupError(f"{self.name} needs references: set [[sources]].references or "
                                  "[model].references to a folder of known-good images")


@dataclass
class SourceState:
    """What the manager knows about one source's references."""

    source_id: str
    files: list[Path] = field(default_factory=list)
    signature: tuple = ()
    detector: Any = None
    version: str | None = None
    error: str | None = None
    warning: str | None = None  # it runs, but not as configured (e.g. without the version's weights): why
    built_at: float | None = None
    shape: tuple[int, int, int] | None = None
    base_version: str | None = None
    failures: int = 0  # failed builds in a row (backoff)
    retry_at: float = 0.0  # monotonic time of the next retry of a failed build with unchanged files

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source_id, "references": len(self.files), "version": self.version,
                "error": self.error, "warning": self.warning, "image_shape": list(self.shape) if self.shape else None,
                "ready": self.detector is not None or self.error is None}


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
        self.listeners: list[Any] = []  # told of every threshold change (daemon/references/thresholds.py), once
        # told (source id) when a source starts running without the active version's learned weights, which do not
        # fit its geometry any more (the service asks the retrainer for a run that learns them)
        self.weights_mismatch_listeners: list[Callable[[str], Any]] = []
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
        newly_mismatched = getattr(detector, "weights_mismatch", None) and not state.warning
        state.warning = getattr(detector, "weights_mismatch", None)
        if newly_mismatched:
            for listener in self.weights_mismatch_listeners:
                try:
                    listener(source_id)
                except Exception:
                    log.exception("source %s: a weights-mismatch listener failed", source_id)
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
        source's own recent frames (daemon/zero_label/start.py)."""
        try:
            options = reference_model_options(self.settings, zero_label_family())
            state.detector = zero_label_detector(self.settings, self._base, options, state.source_id)
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
        cfg = configured_source(self.settings, source_id)
        class_name = (cfg.class_name if cfg is not None else None) or self.settings.model.class_name
        scores, maxima, methods = self._known_good(state, class_name)
        if not scores:
            log.info("source %s: too few known-good frames to calibrate (%d reference); keeping the configured "
                     "thresholds", source_id, len(state.files))
            return None
        from daemon.references.thresholds import Calibration, apply_calibration

        image, pixel = calibrated_bounds(scores, maxima, rate, what=f"source {source_id}")
        floor = capabilities_of(state.detector).threshold_floor  # e.g. a head's decision boundary
        image, pixel = floored(image, floor), floored(pixel, floor)
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
        from daemon.references.thresholds import changes_after, latest_change_id

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
                self._auto_accept(source_id)
                changed |= self._build(source_id)
            self.refresh_thresholds()
            if changed and self._swap is not None:
                self._swap(self._routed())
            return changed

    def _auto_accept(self, source_id: str) -> None:
        """`[mutual] auto_accept`: a zero-label source approves its own proposal (daemon/references/auto_accept.py); the
        new files are then built like an operator's approval."""
        mutual, state = getattr(self.settings, "mutual", None), self.states.get(source_id)
        if (mutual is None or not mutual.auto_accept or state is None or self.sessions is None or self.store is None
                or not str(state.version or "").startswith(version_prefix())
                or scores_own_frames(self._base)):  # [model].name = "mutual": nothing to switch to
            return
        from daemon.references.auto_accept import accept_proposal

        try:
            accept_proposal(self.settings, self.sessions, self.store, source_id)
        except Exception:  # a frame gone (retention), a size mismatch: keep mutual scoring, say why, try again later
            log.exception("source %s: [mutual] auto_accept could not approve the proposal", source_id)

    def status(self) -> dict[str, Any]:
        return {sid: st.as_dict() for sid, st in self.states.items()}
