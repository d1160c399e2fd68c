"""The service's background jobs: the active-model watcher (hot swap), the retrainer and its schedule, and
retention (or, with retention off, the sweep of artifact files a SIGKILL left without a row)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from daemon.learning.retraining import Retrainer, RetrainingScheduler
    from daemon.learning.versions import ModelWatcher
    from daemon.process.retention import RetentionJob

log = logging.getLogger("anomalyd.service")

RETENTION_INTERVAL_S = 3600.0
ORPHAN_SWEEP_DELAY_S = 5.0  # the first orphan sweep, soon after start (files left by a SIGKILL)


class BackgroundJobs:
    """Started once the pipeline runs, stopped first on shutdown."""

    def __init__(self) -> None:
        self.models: ModelWatcher | None = None  # hot-swaps to the registry's active version
        self.retrainer: Retrainer | None = None  # runs from the API / the scheduler
        self.retraining: RetrainingScheduler | None = None  # when [retraining].enabled
        self.retention: RetentionJob | None = None  # when [storage].retention_days is set
        self.orphan_sweeper: RetentionJob | None = None  # only sweeps orphan files, when retention is off
        self._settings: Any = None
        self._geometry_requests: list[str] = []  # sources that asked before the retrainer existed

    def start(self, settings: Any, sessions: Any, store: Any, *, current: Callable[[], Any],
              swap: Callable[[Any], threading.Event]) -> None:
        from daemon.learning.head_retraining import make_retrainer
        from daemon.learning.retraining import RetrainingScheduler
        from daemon.learning.versions import ModelWatcher
        from daemon.process.retention import RetentionJob

        self._settings = settings
        self.models = ModelWatcher(settings, sessions, current=current, swap=swap)
        self.models.start()
        self.retrainer = make_retrainer(settings, sessions, on_activated=self.models.check)
        interrupted = self.retrainer.recover_interrupted()
        if interrupted:
            log.warning("%d retraining run(s) interrupted by the last stop marked failed", interrupted)
        if settings.retraining.enabled:
            self.retraining = RetrainingScheduler(self.retrainer)
            self.retraining.start()
        for source_id in self._geometry_requests:  # a geometry change found while the service started
            self.retrain_for_geometry(source_id)
        self._geometry_requests.clear()
        if settings.storage.retention_days:  # 0 = keep forever
            self.retention = RetentionJob.from_settings(settings, sessions, store)
            self.retention.start(interval_s=RETENTION_INTERVAL_S, initial_delay_s=60.0)
        else:  # rows kept forever, but files a SIGKILL left without a row are still swept, at start and hourly
            self.orphan_sweeper = RetentionJob(sessions, store, None)
            self.orphan_sweeper.start(interval_s=RETENTION_INTERVAL_S, initial_delay_s=ORPHAN_SWEEP_DELAY_S)

    def retrain_for_geometry(self, source_id: str) -> None:
        """A source runs without the active version's learned weights (they were trained on another geometry): with
        `[retraining].enabled`, a run now (trigger "geometry") learns weights for its geometry from the stored
        labels, rather than waiting for the schedule. The run and its gate are the usual ones; a run already in
        progress, or one refused (too few labels of that geometry), is recorded and logged as any run."""
        from daemon.learning.retraining import RetrainBusyError

        if self._settings is None:
            self._geometry_requests.append(source_id)
            return
        if not self._settings.retraining.enabled or self.retrainer is None:
            log.info("source %s: runs without the active version's learned weights; [retraining] is off, so they "
                     "are learned for its geometry by the next run you start", source_id)
            return
        try:
            run_id = self.retrainer.start_in_background(trigger="geometry")
        except RetrainBusyError as exc:
            log.warning("source %s: geometry changed, no retraining started (%s); the next run learns it",
                        source_id, exc)
            return
        log.warning("source %s: geometry changed under a trained version: retraining run #%d started for it",
                    source_id, run_id)

    def stop(self) -> None:
        if self.retention is not None:
            self.retention.stop()
        if self.orphan_sweeper is not None:
            self.orphan_sweeper.stop()
        if self.retraining is not None:
            self.retraining.stop()
        elif self.retrainer is not None:
            self.retrainer.cancel()
        if self.models is not None:
            self.models.stop()
