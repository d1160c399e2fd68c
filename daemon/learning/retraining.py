"""Retraining from operator labels (AnomalyCLIP's prompts, or AdaCLIP's prompts and heads): schedule, training
set, training job, evaluation, promotion.

A run (`Retrainer.run`):
1. a `training_runs` row (status running, the parameters);
2. the training set: every labelled inspection whose frame artifact is still stored (the latest label wins);
   image-level labels train the global loss, a label's mask (when the operator drew one) the local loss too;
   with fewer than `min_anomalous` labelled defects, synthetic anomalies are made on the normal frames;
3. a held-out part (`holdout_fraction`), assigned by a hash of each inspection's uuid so a frame stays on the
   same side across runs (the active model, trained by an earlier run, never saw the held-out frames);
4. training in a separate, niced process (`python -m daemon.learning.retraining_job SPEC`), fine-tuning the active
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

import json
import logging
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from adapters.db.tables import Label, TrainingRun, utcnow
from daemon.config.schedule import Schedule, parse_schedule
from daemon.learning import versions as registry
from daemon.learning.promotion import Promotion, jsonable
from daemon.learning.supervisor import JobSupervisor, JobTimeout, ProgressCallback, last_line
from daemon.learning.training_set import RetrainError, TrainingSetBuilder

if TYPE_CHECKING:
    from daemon.api.app import AppState
    from daemon.config.settings import Settings

log = logging.getLogger("anomalyd.retraining")

LOG_TAIL_CHARS = 20_000


class RetrainBusyError(RetrainError):
    """Another retraining run is in progress."""


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

    A run has three jobs, each its own object: the training set (`daemon.learning.training_set.TrainingSetBuilder`:
    labelled frames → the job spec), the training process (`daemon.learning.supervisor.JobSupervisor`) and the
    promotion decision (`daemon.learning.promotion.Promotion`); this class keeps the run's bookkeeping (the `training_runs`
    row, one run at a time) and calls them in order.

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
