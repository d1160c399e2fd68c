"""Retraining from operator labels (AnomalyCLIP's prompts, or AdaCLIP's prompts and heads): schedule, training
set, training job, evaluation, promotion.

A run (`Retrainer.run`):
1. a `training_runs` row (status running, the parameters);
2. the training set: every labelled inspection whose frame artifact is still stored (the latest label wins);
   image-level labels train the global loss, a label's mask (when the operator drew one) the local loss too;
   with fewer than `min_anomalous` labelled defects, synthetic anomalies are made on the normal frames;
3. a held-out part (`holdout_fraction`), assigned by a hash of each inspection's uuid so a frame stays on the
   same side across runs (the active model, trained by an earlier run, never saw the held-out frames);
4. training in a separate, niced process (`python -m daemon.retraining_job SPEC`), fine-tuning the active
   version's weights when it is of the same model, so inspection keeps its CPU/GPU priority and a crash there
   cannot take the daemon down; AdaCLIP's class-aware prompts take each frame's source `class_name`;
   the same process evaluates the candidate and the active model on the held-out frames (with synthetic defects on
   held-out normals when the held-out part has no labelled defect, so image AUROC is defined);
5. the decision (`promotion_decision`: rule not_worse | better | always on `metric` with `tolerance`); the
   candidate is registered in `model_versions` with both models' metrics; with promotion "auto" a passing
   candidate is activated (the watcher hot-swaps it), a failing one is retired; with "manual" a passing one stays
   a candidate for the operator;
6. the run row gets status succeeded | failed | cancelled, the metrics, the promotion and the job's log tail.

`RetrainingScheduler` runs in the daemon: at each due time of `[retraining].schedule` (cron or interval) it starts
a run when at least `min_new_labels` labels arrived since the last completed run. `request_retrain(state)` is the
operator API's entry (a run now, in the background, whatever the label count).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from adapters.db.repository import active_model_version
from adapters.db.tables import Inspection, Label, ModelVersion, TrainingRun, utcnow
from daemon import versions as registry
from daemon.promotion import Promotion, jsonable, promotion_decision
from daemon.retrain_supervisor import JobSupervisor, JobTimeout, ProgressCallback, last_line
from daemon.schedule import COMPARABLE_METRICS, Schedule, parse_schedule

if TYPE_CHECKING:
    from daemon.app import AppState
    from daemon.config import Settings

log = logging.getLogger("anomalyd.retraining")

LOG_TAIL_CHARS = 20_000


class RetrainError(RuntimeError):
    """A run that cannot go on (no labelled frames, the job failed); recorded on the run row."""


class RetrainBusyError(RetrainError):
    """Another retraining run is in progress."""


# --- schedule ----------------------------------------------------------------------------------------------------

# Schedule, parse_schedule, COMPARABLE_METRICS: in daemon.schedule (config validation imports them without
# SQLAlchemy); re-exported here.


# --- training data -----------------------------------------------------------------------------------------------


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


def last_completed_run(session: Session) -> TrainingRun | None:
    return session.scalars(select(TrainingRun).where(TrainingRun.status == "succeeded")
                           .order_by(TrainingRun.started_at.desc(), TrainingRun.id.desc())).first()


def new_labels_since_last_run(session: Session) -> int:
    """Labels recorded after the start of the last completed run (all labels when there was none)."""
    last = last_completed_run(session)
    query = select(func.count()).select_from(Label)
    if last is not None:
        query = query.where(Label.created_at > last.started_at)
    return int(session.scalar(query) or 0)


# --- a run -------------------------------------------------------------------------------------------------------


@dataclass
class RetrainOutcome:
    run_id: int
    status: str  # succeeded | failed | cancelled
    candidate_version: str | None = None
    promoted: bool = False
    passes: bool = False
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Retrainer:
    """Runs retraining for one database and artifact store (the daemon's, or the CLI's for `retrain --now`).

    A run has three jobs, each its own object: the training set (`TrainingSetBuilder`, below: labelled frames →
    the job spec), the training process (`daemon.retrain_supervisor.JobSupervisor`) and the promotion decision
    (`daemon.promotion.Promotion`); this class keeps the run's bookkeeping (the `training_runs` row, one run at
    a time) and calls them in order.

    `on_activated()` is called after a promotion (the daemon checks its watcher at once instead of at the next
    poll). One run at a time per database: a run row still `running` (and younger than `timeout_s`) blocks others.
    """

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], *,
                 on_activated: Callable[[], Any] | None = None) -> None:
        self.settings = settings
        self.sessions = sessions
        self.config = settings.retraining
        self.training_set = TrainingSetBuilder(settings, sessions)
        self.job = JobSupervisor(self.config.timeout_s)
        self.promotion = Promotion(settings, sessions, on_activated=on_activated)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.last_outcome: RetrainOutcome | None = None

    @property
    def _process(self) -> subprocess.Popen | None:
        """The training process in progress, if any."""
        return self.job.process

    # -- bookkeeping --

    def recover_interrupted(self) -> int:
        """Mark runs this host left `running` (a daemon stopped mid-run) as failed; returns how many."""
        host = socket.gethostname()
        with self.sessions() as session, session.begin():
            rows = [row for row in session.scalars(select(TrainingRun).where(TrainingRun.status == "running"))
                    if (row.params or {}).get("host") in (host, None)]
            for row in rows:
                row.status, row.finished_at = "failed", utcnow()
                row.log = (row.log or "") + "\ninterrupted: the daemon stopped during this run"
        return len(rows)

    def _begin(self, trigger: str) -> int:
        """The run row, or RetrainBusyError when another run is in progress."""
        stale_before = utcnow() - timedelta(seconds=self.config.timeout_s + 600)
        with self.sessions() as session, session.begin():
            running = session.scalars(select(TrainingRun).where(TrainingRun.status == "running",
                                                                TrainingRun.started_at > stale_before)).first()
            if running is not None:
                raise RetrainBusyError(f"retraining run #{running.id} is in progress since "
                                       f"{running.started_at:%Y-%m-%d %H:%M:%S} UTC")
            params = self.config.model_dump() | {"trigger": trigger, "host": socket.gethostname(),
                                                 "image_size": self.training_set.image_size(),
                                                 "device": self.training_set.device()}
            row = TrainingRun(status="running", params=params)
            session.add(row)
            session.flush()
            return row.id

    def _finish(self, run_id: int, outcome: RetrainOutcome, log_text: str) -> None:
        with self.sessions() as session, session.begin():
            row = session.get(TrainingRun, run_id)
            row.status, row.finished_at = outcome.status, utcnow()
            row.metrics = jsonable(outcome.metrics) or None
            row.candidate_version, row.promoted = outcome.candidate_version, outcome.promoted
            row.log = log_text[-LOG_TAIL_CHARS:]

    # -- public --

    @property
    def running(self) -> bool:
        return self._lock.locked()

    def start_in_background(self, trigger: str = "api") -> int:
        """Start a run in a thread and return its run id (RetrainBusyError when one is in progress)."""
        if not self._lock.acquire(blocking=False):
            raise RetrainBusyError("a retraining run of this daemon is in progress")
        try:
            run_id = self._begin(trigger)
        except BaseException:
            self._lock.release()
            raise

        def work() -> None:
            try:
                self._run_locked(run_id, None)
            except Exception:
                log.exception("retraining run #%d failed", run_id)
            finally:
                self._lock.release()

        self._thread = threading.Thread(target=work, name=f"retrain-{run_id}", daemon=True)
        self._thread.start()
        return run_id

    def run(self, trigger: str = "manual", progress: ProgressCallback | None = None) -> RetrainOutcome:
        """A whole run in the calling thread (the scheduler's, or `anomalyd retrain --now`)."""
        if not self._lock.acquire(blocking=False):
            raise RetrainBusyError("a retraining run of this daemon is in progress")
        try:
            return self._run_locked(self._begin(trigger), progress)
        finally:
            self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a background run; True when none is left running."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def cancel(self, timeout: float = 10.0) -> None:
        """Stop a run in progress (daemon shutdown): the training process is terminated, the run `cancelled`."""
        self.job.cancel(timeout)
        self.wait(timeout)

    # -- the run --

    def _run_locked(self, run_id: int, progress: ProgressCallback | None) -> RetrainOutcome:
        self.job.cancelled.clear()
        lines: list[str] = []

        def note(message: str) -> None:
            log.info("retraining run #%d: %s", run_id, message)
            lines.append(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} {message}")

        run_dir = registry.models_dir(self.settings) / "runs" / str(run_id)
        outcome = RetrainOutcome(run_id, "failed")
        job_log = ""
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            spec, counts = self.training_set.build(run_id, run_dir, note)
            outcome.metrics["data"] = counts
            try:
                rc, job_log = self.job.run(run_dir, spec, progress, note)
            except JobTimeout as exc:
                raise RetrainError(str(exc)) from None
            if self.job.cancelled.is_set():
                outcome.status, outcome.reason = "cancelled", "cancelled (daemon stopping)"
                note(outcome.reason)
                return outcome
            if rc != 0:
                raise RetrainError(f"the training process exited with status {rc}: {last_line(job_log)}")
            result = json.loads((run_dir / "result.json").read_text(encoding="utf-8"))
            self.promotion.decide(spec, result, outcome, note)
            shutil.rmtree(run_dir / "work", ignore_errors=True)
        except Exception as exc:
            outcome.status, outcome.reason = "failed", str(exc)
            note(f"failed: {exc}")
            if not isinstance(exc, RetrainError):
                log.exception("retraining run #%d", run_id)
        finally:
            text = "\n".join(lines)
            if job_log:
                text += "\n--- training process ---\n" + job_log[-(LOG_TAIL_CHARS - len(text) - 40):]
            self._finish(run_id, outcome, text)
            self.last_outcome = outcome
        return outcome



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
            "model": {"kind": m.name, "backbone": self.settings.backbone_file(),
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
        if get_family(kind).needs_class_name:
            missing = sorted({f.category for f in frames if not (by_source.get(f.category) or default)})
            if missing:
                raise RetrainError(f"{kind} needs the object class of each frame: set class_name on source(s) "
                                   f"{', '.join(missing)} or [model].class_name")
        return named

# --- scheduler ---------------------------------------------------------------------------------------------------


class RetrainingScheduler:
    """The daemon's thread: at each due time, a run when enough new labels arrived."""

    def __init__(self, retrainer: Retrainer, schedule: Schedule | None = None, *,
                 now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> None:
        self.retrainer = retrainer
        self.schedule = schedule or parse_schedule(retrainer.config.schedule)
        self.min_new_labels = retrainer.config.min_new_labels
        self.now = now
        self.next_due: datetime | None = None
        self.last_decision: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.next_due = self.schedule.next_after(self.now())
        log.info("retraining scheduled %s; next check %s", self.schedule.describe(), self.next_due.isoformat())
        self._thread = threading.Thread(target=self._loop, name="retrain-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.retrainer.cancel(timeout)
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            assert self.next_due is not None
            wait = (self.next_due - self.now()).total_seconds()
            if wait > 0:
                self._stop.wait(min(wait, 60.0))
                continue
            try:
                self.tick()
            except Exception:
                log.exception("scheduled retraining failed")
            self.next_due = self.schedule.next_after(self.now())

    def tick(self) -> RetrainOutcome | None:
        """One due time: a run when at least `min_new_labels` labels arrived since the last completed run."""
        with self.retrainer.sessions() as session:
            new = new_labels_since_last_run(session)
        if new < self.min_new_labels:
            self.last_decision = f"skipped: {new} new labels, {self.min_new_labels} needed"
            log.info("scheduled retraining %s", self.last_decision)
            return None
        if self.retrainer.running:
            self.last_decision = "skipped: a run is in progress"
            return None
        self.last_decision = f"started: {new} new labels"
        try:
            return self.retrainer.run(trigger="schedule")
        except RetrainBusyError as exc:
            self.last_decision = f"skipped: {exc}"
            return None


def request_retrain(state: AppState) -> dict[str, Any]:
    """The operator API's `POST /api/retrain`: start a run now in the background, whatever the label count.

    Uses `state.retrainer` (the daemon's); an API without the daemon around it (tests, a separate API process)
    gets one made on first use. Returns {"run_id", "status": "running"}; raises RetrainBusyError when a run is in
    progress (HTTP 409).
    """
    if state.retrainer is None:
        state.retrainer = Retrainer(state.settings, state.sessions)
    run_id = state.retrainer.start_in_background(trigger="api")
    return {"run_id": run_id, "status": "running"}


def run_summary(row: TrainingRun) -> dict[str, Any]:
    """A training run as the API/CLI show it."""
    return {"id": row.id, "status": row.status, "started_at": row.started_at, "finished_at": row.finished_at,
            "candidate_version": row.candidate_version, "promoted": row.promoted,
            "trigger": (row.params or {}).get("trigger"), "metrics": row.metrics}


def training_runs(session: Session, limit: int = 20) -> list[TrainingRun]:
    return list(session.scalars(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(limit)))


__all__ = [
    "COMPARABLE_METRICS", "LabelledFrame", "ModelVersion", "RetrainBusyError", "RetrainError", "RetrainOutcome",
    "Retrainer", "RetrainingScheduler", "Schedule", "collect_labelled_frames", "last_completed_run",
    "new_labels_since_last_run", "parse_schedule", "promotion_decision", "request_retrain", "run_summary",
    "split_holdout", "training_runs",
]
