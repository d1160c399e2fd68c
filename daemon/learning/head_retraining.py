"""Retraining a family fitted on each source's references: operator labels train the family that the configured
one declares (`Capabilities.retrains_as`, e.g. a PatchCore daemon's labels train a head, model/supervised/) when that
family learns from labels by its own `fit_samples` on its sources' references.

The run itself is the retrainer's (daemon/learning/retraining.py: the `training_runs` row, one run at a time, the job
process, the promotion gate of daemon/learning/promotion.py, the version registry); this module gives it what differs for a
head:
- `HeadTrainingSet`, the training set: the labelled frames (latest label per inspection, masks where drawn),
  the same held-out split by uuid hash except that labelled false alarms always train, and per source its reference
  files (the ones its bank is built from), in a
  job for `python -m daemon.learning.head_retraining_job`; refused with the number needed while fewer than
  `MIN_LABELLED_DEFECTS` frames are labelled anomalous; learned weights fit one resize mode, so sources of
  different modes (`squash`, `fit`) are grouped by mode and the family learns weights per mode (one file holding
  them all), a mode with fewer labelled defects learning none (its sources keep the base model, said in the run's
  log), split into train and held-out per mode;
- `make_retrainer`: a `Retrainer` with that training set when the configured model retrains such a family
  (`learns_on_references`; the daemon, `POST /api/retrain` and `anomalyd retrain --now` use it);
- `refusal`: why a retraining request is refused up front (409 / exit 2), or None.

The candidate is a version of the trained family (kind) whose weights file is what it learned (a head). Activated (by the gate with
`promotion = "auto"`, or `anomalyd models activate`), the model watcher builds its base (daemon/learning/versions.py:
`reference_version_base`), the reference manager rebuilds each source's detector with the head and calibrates it:
a new (source, version) threshold row and its threshold-history record (daemon/references/manager.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from adapters.db.repository import active_model_version
from daemon.learning.retraining import Retrainer
from daemon.learning.training_set import LabelledFrame, RetrainError, collect_labelled_frames, split_holdout

if TYPE_CHECKING:
    from daemon.api.app import AppState
    from daemon.config.settings import Settings

MIN_LABELLED_DEFECTS = 4  # one held out, three to train at least
HEAD_STEPS = 100  # the head's optimiser steps (model/supervised/training.py: seconds on one core)
SYNTHETIC_PER_REFERENCE = 3


def learns_on_references(model_name: str) -> bool:
    """Retraining `model_name` trains a family that learns from labels on its sources' references (its own
    `fit_samples`, not the prompt-training loop), e.g. a head for PatchCore."""
    from model.factory import retraining_family

    try:
        family = retraining_family(model_name)
    except ValueError:
        return False
    return family.training is None and family.fit_samples is not None and family.caps.needs_references


def trained_family(model_name: str) -> str:
    """The name of the family whose version retraining `model_name` produces."""
    from model.factory import retraining_family

    return retraining_family(model_name).name


def labelled_counts(session: Session) -> dict[str, int]:
    """Inspections whose newest label is anomalous / normal."""
    from adapters.db.repository import latest_label_subquery
    from adapters.db.tables import Inspection

    newest = latest_label_subquery()
    return {label: int(session.scalar(select(func.count()).select_from(Inspection).where(newest == label)) or 0)
            for label in ("anomalous", "normal")}


def refusal(settings: Settings, sessions: sessionmaker[Session] | None) -> str | None:
    """Why retraining the configured model is refused before any run starts (None: it may start)."""
    from model.factory import capabilities, get_family, list_models

    name = settings.model.name
    if learns_on_references(name):
        if sessions is None:
            return None
        with sessions() as session:
            defects = labelled_counts(session)["anomalous"]
        if defects < MIN_LABELLED_DEFECTS:
            return (f"retraining {name!r} trains a {trained_family(name)} from labelled defects: {defects} frame(s) "
                    "labelled "
                    f"anomalous, at least {MIN_LABELLED_DEFECTS} needed (label {MIN_LABELLED_DEFECTS - defects} "
                    "more defective frames; masks help but are optional)")
        return None
    if get_family(name).trainable:
        return None
    others = [f"a {capabilities(n).retrains_as} for {n}" for n in list_models() if capabilities(n).retrains_as]
    return (f"[model].name {name!r} has nothing to learn (it is built from its references; add or remove "
            f"references instead); retraining trains {', '.join([*list_models(trainable=True), *others])}")


class HeadTrainingSet:
    """The job of a head retraining run (see the module docstring); the retrainer calls `build`."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.config = settings.retraining
        self.artifacts_root = settings.resolve(settings.storage.dir)

    def image_size(self) -> int:
        """The daemon's PatchCore size ([model].image_size), whatever [retraining].image_size says: a head only
        fits the PatchCore it was trained on."""
        from daemon.config.model_options import reference_model_options

        return int(reference_model_options(self.settings).get("image_size", 256))

    def device(self) -> str:
        return str(self.config.device or self.settings.runtime.device)

    def _references(self, source_ids: set[str]) -> dict[str, list[str]]:
        from adapters.storage import ArtifactStore
        from daemon.references.files import ReferenceSetupError, reference_files

        store = ArtifactStore(self.artifacts_root)
        out: dict[str, list[str]] = {}
        for source_id in sorted(source_ids):
            try:
                files, _ = reference_files(self.settings, source_id, self.sessions, store)
            except ReferenceSetupError as exc:
                raise RetrainError(str(exc)) from None
            out[source_id] = [str(f) for f in files if f.suffix != ".safetensors"]
        return out

    def _geometries(self, family: str, sources: set[str]) -> dict[str, dict[str, Any]]:
        """Each source's effective frame geometry (config or an operator's override) when the trained family runs
        on it ({} when it takes squashed frames); RetrainError naming a source's geometry that cannot be applied.
        Sources of different resize modes are fine: the family learns weights per mode (`_by_mode`)."""
        from daemon.config.geometry import supports_geometry
        from daemon.references.geometry_overrides import effective_geometry

        if not supports_geometry(family):
            return {}
        try:
            geometries = {s: effective_geometry(self.settings, s) for s in sorted(sources)}
        except ValueError as exc:
            raise RetrainError(str(exc)) from None
        return {s: g.as_dict() for s, g in geometries.items()}

    @staticmethod
    def _by_mode(frames: list[LabelledFrame], geometries: dict[str, dict[str, Any]], family: str,
                 note: Callable[[str], None]) -> tuple[list[LabelledFrame], dict[str, list[str]]]:
        """(the frames of the resize modes with enough labelled defects, {mode: its sources}). Learned weights fit
        one resize mode, so the family learns them per mode; a mode with fewer than MIN_LABELLED_DEFECTS learns
        none and its sources keep the base model (said in the run's log). RetrainError when no mode has enough."""
        modes: dict[str, list[str]] = {}
        for source in sorted({f.category for f in frames}):
            modes.setdefault(str((geometries.get(source) or {}).get("resize", "squash")), []).append(source)
        kept: dict[str, list[str]] = {}
        short: list[str] = []
        for mode, sources in sorted(modes.items()):
            defects = sum(f.label for f in frames if f.category in sources)
            if defects >= MIN_LABELLED_DEFECTS:
                kept[mode] = sources
                continue
            short.append(f"resize {mode} (sources {', '.join(sources)}): {defects}")
            note(f"resize {mode}: {defects} labelled defective frame(s) of sources {', '.join(sources)}, a {family} "
                 f"needs at least {MIN_LABELLED_DEFECTS}: no weights are learned for this mode, its sources keep "
                 "the base model")
        if not kept:
            raise RetrainError(f"labelled defective frames per resize mode ({'; '.join(short)}): a {family} learns "
                               f"per resize mode and needs at least {MIN_LABELLED_DEFECTS} of one; label more "
                               "defective frames")
        if len(kept) > 1:
            note("sources differ in resize: one set of weights per mode (" +
                 "; ".join(f"{m}: {', '.join(s)}" for m, s in kept.items()) + ")")
        sources_kept = {s for sources in kept.values() for s in sources}
        return [f for f in frames if f.category in sources_kept], kept

    def _false_alarms_train(self, train: list[LabelledFrame], holdout: list[LabelledFrame]
                            ) -> tuple[list[LabelledFrame], list[LabelledFrame]]:
        """Labelled false alarms (labelled normal, alerted when inspected) always train: the operator's correction
        must be learned, not only judged. The gate judges on the other held-out frames."""
        normals = [f.inspection_id for f in holdout if f.label == 0]
        if not normals:
            return train, holdout
        from adapters.db.tables import Inspection

        with self.sessions() as session:
            alerted = set(session.scalars(select(Inspection.id).where(Inspection.id.in_(normals),
                                                                      Inspection.is_anomalous.is_(True))))
        moved = [f for f in holdout if f.inspection_id in alerted]
        return (sorted(train + moved, key=lambda f: f.inspection_id),
                [f for f in holdout if f.inspection_id not in alerted])

    def build(self, run_id: int, run_dir: Path, note: Callable[[str], None]) -> tuple[dict[str, Any], dict]:
        """The job spec (written to `run_dir/job.json`) and the data counts; RetrainError when there is too
        little to train on or to evaluate."""
        from daemon.config.model_options import reference_model_options

        cfg = self.config
        family = trained_family(self.settings.model.name)
        with self.sessions() as session:
            frames, problems = collect_labelled_frames(session, self.artifacts_root)
            active = active_model_version(session)
        for problem in problems[:50]:
            note(f"skipped: {problem}")
        defects = sum(f.label for f in frames)
        if defects < MIN_LABELLED_DEFECTS:
            raise RetrainError(f"{defects} labelled defective frame(s) with a stored frame: a {family} needs at "
                               f"least {MIN_LABELLED_DEFECTS}; label more defective frames")
        references = self._references({f.category for f in frames})
        usable = {s for s, files in references.items() if len(files) >= 2}
        for source in sorted(set(references) - usable):
            note(f"source {source}: {len(references[source])} reference(s); its labelled frames are left out "
                 "(a head is trained on a bank of 2 or more)")
        if not usable:
            raise RetrainError(f"no source of the labelled frames ({', '.join(sorted(references)) or 'none'}) has 2 or "
                               "more references: a head is trained on its source's PatchCore bank; add references")
        frames = [f for f in frames if f.category in usable]
        geometries = self._geometries(family, usable)
        frames, modes = self._by_mode(frames, geometries, family, note)
        usable = {s for sources in modes.values() for s in sources}
        geometries = {s: g for s, g in geometries.items() if s in usable}
        train, holdout = [], []
        for sources in modes.values():  # split per mode: each mode's weights train on some, are judged on others
            mode_train, mode_holdout = split_holdout([f for f in frames if f.category in sources],
                                                     cfg.holdout_fraction)
            train += mode_train
            holdout += mode_holdout
        train, holdout = self._false_alarms_train(sorted(train, key=lambda f: f.inspection_id),
                                                  sorted(holdout, key=lambda f: f.inspection_id))
        if not any(f.label for f in train) or not any(f.label for f in holdout):
            raise RetrainError(f"{sum(f.label for f in frames)} labelled defect(s) of sources with references: "
                               f"need at least {MIN_LABELLED_DEFECTS} (some train, some are held out to judge)")
        counts = {"labelled": len(frames), "missing_frames": len(problems), "train": len(train),
                  "train_anomalous": sum(f.label for f in train),
                  "train_with_mask": sum(f.mask is not None for f in train), "holdout": len(holdout),
                  "holdout_anomalous": sum(f.label for f in holdout), "synthetic_train": True,
                  "sources": sorted(usable), "modes": modes}
        note(f"{len(train)} training frames ({counts['train_anomalous']} defects, {counts['train_with_mask']} with "
             f"masks, plus synthetic defects on the references), {len(holdout)} held out; sources "
             f"{', '.join(sorted(usable))}")
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        version = f"{family}-{stamp}-r{run_id}"
        options = reference_model_options(self.settings, family)
        options["image_size"] = self.image_size()
        options = {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()}
        spec = {
            "run_id": run_id, "version": version, "job_module": "daemon.learning.head_retraining_job",
            "output": str(run_dir / "work" / "head.safetensors"), "result": str(run_dir / "result.json"),
            "model": {"kind": family, "image_size": options["image_size"], "options": options},
            "sources": {s: references[s] for s in sorted(usable)},
            "geometry": geometries,  # each source's as the daemon runs it: train and judge on the same inputs
            "active": ({"version": active.version, "kind": active.kind, "prompts": active.prompts_path}
                       if active is not None else None),
            "train": [f.as_job_item() for f in train], "holdout": [f.as_job_item() for f in holdout],
            "training": {"epochs": 1, "steps": HEAD_STEPS, "seed": cfg.seed,
                         "synthetic_per_reference": SYNTHETIC_PER_REFERENCE},
            "false_reject_rate": float(self.settings.model.false_reject_rate or 0.005),
            "cnn_runtime": self.settings.runtime.cnn,  # the job embeds frames with the daemon's CPU trunk runtime
            "device": self.device(), "nice": cfg.nice, "threads": cfg.threads or max(1, (os.cpu_count() or 2) // 2),
        }
        import json

        (run_dir / "job.json").write_text(json.dumps(spec, indent=1), encoding="utf-8")
        return spec, counts


def make_retrainer(settings: Settings, sessions: sessionmaker[Session], *,
                   on_activated: Callable[[], Any] | None = None) -> Retrainer:
    """The retrainer for the configured model: the references-based training set when it retrains a family fitted
    on its sources' references (`learns_on_references`), the prompt-training one otherwise."""
    retrainer = Retrainer(settings, sessions, on_activated=on_activated)
    if learns_on_references(settings.model.name):
        retrainer.training_set = HeadTrainingSet(settings, sessions)  # type: ignore[assignment]
    return retrainer


def request_retrain(state: AppState) -> dict[str, Any]:
    """`POST /api/retrain`: `daemon.learning.retraining.request_retrain` with the retrainer `make_retrainer` gives."""
    if state.retrainer is None:
        state.retrainer = make_retrainer(state.settings, state.sessions)
    run_id = state.retrainer.start_in_background(trigger="api")
    return {"run_id": run_id, "status": "running"}
