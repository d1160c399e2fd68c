"""A retraining run's training set: the labelled frames with their stored frames and masks (the latest label of each
inspection wins), split into training and held-out parts by a hash of each inspection's uuid (so a frame stays on
the same side across runs), the synthetic-defect choice, and the job spec the training process reads
(`daemon/learning/retraining_job.py`). The family's capabilities (`model.factory.ModelFamily`) decide whether it can be
retrained at all and whether each frame needs its object's class name; daemon/learning/retraining.py runs the whole run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from adapters.db.repository import active_model_version
from adapters.db.tables import Inspection, Label

if TYPE_CHECKING:
    from daemon.config.settings import Settings


class RetrainError(RuntimeError):
    """A run that cannot go on (no labelled frames, the job failed); recorded on the run row."""


@dataclass
class LabelledFrame:
    inspection_id: int
    uuid: str
    frame: Path
    label: int  # 0 normal, 1 anomalous
    mask: Path | None  # the operator's mask (anomalous only)
    category: str

    def as_job_item(self) -> dict[str, Any]:
        return {"inspection_id": self.inspection_id, "path": str(self.frame), "label": self.label,
                "mask": str(self.mask) if self.mask else None, "category": self.category}


def _artifact(root: Path, relative: str | None) -> Path | None:
    if not relative:
        return None
    path = Path(relative)
    return path if path.is_absolute() else root / path


def collect_labelled_frames(session: Session, artifacts_root: Path) -> tuple[list[LabelledFrame], list[str]]:
    """Labelled inspections with their stored frame (latest label per inspection), by inspection id.

    Returns (frames, problems): a labelled row whose frame file is gone is a problem (named), not a silent drop.
    """
    newest = (select(Label.inspection_id, func.max(Label.id).label("label_id"))
              .group_by(Label.inspection_id).subquery())
    rows = session.execute(
        select(Inspection, Label).join(newest, newest.c.inspection_id == Inspection.id)
        .join(Label, Label.id == newest.c.label_id).order_by(Inspection.id)
    ).all()
    frames: list[LabelledFrame] = []
    problems: list[str] = []
    for inspection, label in rows:
        frame = _artifact(artifacts_root, inspection.frame_path)
        if frame is None or not frame.is_file():
            problems.append(f"inspection {inspection.id}: frame file {frame or '(not stored)'} is missing")
            continue
        mask = _artifact(artifacts_root, label.mask_path) if label.label == "anomalous" else None
        if mask is not None and not mask.is_file():
            problems.append(f"inspection {inspection.id}: label mask {mask} is missing; image-level label used")
            mask = None
        frames.append(LabelledFrame(inspection.id, inspection.uuid, frame, int(label.label == "anomalous"), mask,
                                    inspection.source))
    return frames, problems


def _hash_fraction(key: str) -> float:
    return int(hashlib.sha1(f"holdout:{key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def split_holdout(frames: list[LabelledFrame], fraction: float) -> tuple[list[LabelledFrame], list[LabelledFrame]]:
    """(train, holdout), per class by a hash of the inspection uuid: stable as labels are added.

    Each class with at least two frames gives at least one to each side; a single-frame class trains.
    """
    train: list[LabelledFrame] = []
    holdout: list[LabelledFrame] = []
    for label in (0, 1):
        members = sorted((f for f in frames if f.label == label), key=lambda f: _hash_fraction(f.uuid))
        held = [f for f in members if _hash_fraction(f.uuid) < fraction]
        if len(members) >= 2:
            if not held:
                held = members[:1]
            if len(held) == len(members):
                held = held[:-1]
        else:
            held = []
        held_ids = {f.inspection_id for f in held}
        holdout += held
        train += [f for f in members if f.inspection_id not in held_ids]
    return sorted(train, key=lambda f: f.inspection_id), sorted(holdout, key=lambda f: f.inspection_id)


class TrainingSetBuilder:
    """The training set of a run: the labelled frames (with their stored frames and masks), split into train and
    held-out parts, the synthetic-defect choice and the job spec the training process reads."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.config = settings.retraining
        self.artifacts_root = settings.resolve(settings.storage.dir)

    def image_size(self) -> int:
        return int(self.config.image_size or self.settings.model.image_size)

    def device(self) -> str:
        return str(self.config.device or self.settings.runtime.device)

    def build(self, run_id: int, run_dir: Path, note: Callable[[str], None]) -> tuple[dict[str, Any], dict]:
        """The job spec (written to `run_dir/job.json`) and the data counts; RetrainError when there is too little
        to train on."""
        return self._prepare(run_id, run_dir, note)

    def _prepare(self, run_id: int, run_dir: Path, note: Callable[[str], None]) -> tuple[dict[str, Any], dict]:
        cfg, m = self.config, self.settings.model
        with self.sessions() as session:
            frames, problems = collect_labelled_frames(session, self.artifacts_root)
            active = active_model_version(session)
        for problem in problems[:50]:
            note(f"skipped: {problem}")
        if len(problems) > 50:
            note(f"... and {len(problems) - 50} more labelled rows without a stored frame")
        if len(frames) < 2:
            raise RetrainError(f"{len(frames)} labelled frame(s) available: need at least 2 (one to train, one to "
                               "evaluate); label inspections first")
        from model.factory import get_family, list_models

        if not get_family(m.name).trainable:
            raise RetrainError(f"[model].name {m.name!r} has nothing to learn; retraining trains "
                               f"{' or '.join(list_models(trainable=True))}")
        frames = self._with_class_names(frames, m.name)
        train, holdout = split_holdout(frames, cfg.holdout_fraction)
        n_anomalous = sum(f.label for f in train)
        synthetic = cfg.synthetic == "on" or (cfg.synthetic == "auto" and n_anomalous < cfg.min_anomalous)
        if synthetic and not any(f.label == 0 for f in train):
            synthetic = False
        if n_anomalous == 0 and not synthetic:
            raise RetrainError("no labelled defects among the training frames and synthetic anomalies are off")
        counts = {"labelled": len(frames), "missing_frames": len(problems), "train": len(train),
                  "train_anomalous": n_anomalous, "train_with_mask": sum(f.mask is not None for f in train),
                  "holdout": len(holdout), "holdout_anomalous": sum(f.label for f in holdout),
                  "synthetic_train": synthetic}
        note(f"{len(train)} training frames ({n_anomalous} defects, {counts['train_with_mask']} with masks"
             f"{', plus synthetic defects on normals' if synthetic else ''}), {len(holdout)} held out")
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        version = f"{m.name}-{stamp}-r{run_id}"
        active_spec = None
        init_prompts = None
        if active is not None:
            active_spec = {"version": active.version, "kind": active.kind, "prompts": active.prompts_path}
            if active.kind == m.name and active.prompts_path and Path(active.prompts_path).is_file():
                init_prompts = active.prompts_path
        threads = cfg.threads or max(1, (os.cpu_count() or 2) // 2)
        spec = {
            "run_id": run_id, "version": version,
            "output": str(run_dir / "work" / "prompts.safetensors"), "result": str(run_dir / "result.json"),
            "model": {"kind": m.name, "family_module": get_family(m.name).module,
                      "backbone": self.settings.backbone_file(),
                      "backbone_config": self.settings.resolve_model_value(m.backbone_config),
                      "layers": list(m.layers), "image_size": self.image_size(), "init_prompts": init_prompts,
                      "transform": "reference" if m.reference_preprocessing else "fast"},
            "active": active_spec,
            "train": [f.as_job_item() for f in train], "holdout": [f.as_job_item() for f in holdout],
            "training": {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate,
                         "seed": cfg.seed},
            "synthetic": synthetic, "device": self.device(), "nice": cfg.nice, "threads": threads,
        }
        (run_dir / "job.json").write_text(json.dumps(spec, indent=1), encoding="utf-8")
        return spec, counts

    def _with_class_names(self, frames: list[LabelledFrame], kind: str) -> list[LabelledFrame]:
        """Each frame's category becomes its source's class name ([[sources]].class_name, else [model].class_name).

        A family whose text prompts name the object (`needs_class_name`, e.g. AdaCLIP) cannot train without one;
        others (AnomalyCLIP's object-agnostic prompts) keep the source id as the category when none is configured.
        """
        by_source = {source.id: source.class_name for source in self.settings.sources}
        default = self.settings.model.class_name
        from model.factory import get_family

        named = [replace(f, category=by_source.get(f.category) or default or f.category) for f in frames]
        if get_family(kind).caps.needs_class_name:
            missing = sorted({f.category for f in frames if not (by_source.get(f.category) or default)})
            if missing:
                raise RetrainError(f"{kind} needs the object class of each frame: set class_name on source(s) "
                                   f"{', '.join(missing)} or [model].class_name")
        return named
