"""Retention: delete inspections older than `[storage].retention_days` together with their artifact files.

Policy: an inspection whose frame was captured more than `retention_days` ago is deleted with its mask, heatmap
and frame files, unless an operator labelled it (normal or anomalous: labels are the operators' flags and the
retraining data, so labelled inspections, their label masks and artifacts are kept for good). Unlabelled
anomalous inspections are deleted like the rest (`keep_anomalous=True` keeps them too; not the ones with no
decision). Rejected-frame records older than the retention are deleted as well. `retention_days` unset (None)
disables the job.

Order, so that no row ever points at a missing file: rows are deleted and committed first, their files after.
A crash between the two leaves orphan files, which the sweep removes: files the server writes (artifact
names only) that no inspection or label row references and that are older than a grace period (so a file
written just before its row commits is never taken for an orphan).

The daemon runs it with `RetentionJob.from_settings(settings, sessions, store).start(interval_s)`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, exists, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from adapters.db import Inspection, Label, RejectedFrame
from adapters.storage import ArtifactStore

if TYPE_CHECKING:
    from daemon.config.settings import Settings

log = logging.getLogger("anomalyd.retention")

# Names the server gives artifact files (adapters.storage and adapters.db.history); nothing else is ever removed.
ARTIFACT_SUFFIXES = ("_mask.png", "_heatmap.jpg", "_frame.jpg", "_label.png")


@dataclass
class RetentionResult:
    inspections_deleted: int = 0
    files_deleted: int = 0
    rejected_deleted: int = 0
    orphans_deleted: int = 0
    kept_labelled: int = 0

    def __str__(self) -> str:
        return (f"{self.inspections_deleted} inspections and {self.files_deleted} files deleted, "
                f"{self.kept_labelled} old labelled inspections kept, {self.rejected_deleted} rejected-frame "
                f"records and {self.orphans_deleted} orphan files deleted")


class RetentionJob:
    """Deletes expired inspections and their files; `run_once()` or a background thread via `start()`."""

    def __init__(
        self, sessions: sessionmaker[Session], store: ArtifactStore, retention_days: int | None, *,
        keep_anomalous: bool = False,
        orphan_grace_s: float = 3600.0, batch_size: int = 500,
    ) -> None:
        self.sessions = sessions
        self.store = store
        self.retention_days = retention_days
        self.keep_anomalous = keep_anomalous
        self.orphan_grace_s = orphan_grace_s
        self.batch_size = batch_size
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_result: RetentionResult | None = None
        self.last_error: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings, sessions: sessionmaker[Session], store: ArtifactStore,
                      **kwargs: Any) -> RetentionJob:
        return cls(sessions, store, settings.storage.retention_days or None, **kwargs)  # 0: keep forever

    # --- one pass ------------------------------------------------------------------------------------------------

    def run_once(self, now: datetime | None = None) -> RetentionResult:
        result = RetentionResult()
        if self.retention_days is None:  # keep rows forever; still remove files a crash left without a row
            result.orphans_deleted = self.sweep_orphans(now)
            self.last_result = result
            return result
        now = now or datetime.now(timezone.utc)
        cutoff = now - timedelta(days=self.retention_days)
        labelled = exists().where(Label.inspection_id == Inspection.id)
        expired = [Inspection.captured_at < cutoff, ~labelled]
        if self.keep_anomalous:  # frames with no decision (NULL: window filling, drift) age out like normal ones
            expired.append(or_(Inspection.is_anomalous.is_(False), Inspection.is_anomalous.is_(None)))
        while True:
            with self.sessions() as session, session.begin():
                rows = session.execute(
                    select(Inspection.id, Inspection.mask_path, Inspection.heatmap_path, Inspection.frame_path)
                    .where(*expired).order_by(Inspection.id).limit(self.batch_size)
                ).all()
                if not rows:
                    break
                ids = [row.id for row in rows]
                # The WHERE is repeated: a label added since the SELECT keeps its inspection.
                session.execute(delete(Inspection).where(Inspection.id.in_(ids), *expired)
                                .execution_options(synchronize_session=False))
                still_there = set(session.scalars(select(Inspection.id).where(Inspection.id.in_(ids))))
            # Committed: now the files of the rows that are really gone.
            gone = [row for row in rows if row.id not in still_there]
            result.inspections_deleted += len(gone)
            result.files_deleted += self._delete_files(
                path for row in gone for path in (row.mask_path, row.heatmap_path, row.frame_path))
            if len(rows) < self.batch_size:
                break
        with self.sessions() as session, session.begin():
            deleted = session.execute(delete(RejectedFrame).where(RejectedFrame.created_at < cutoff))
            result.rejected_deleted = int(deleted.rowcount or 0)
            result.kept_labelled = int(session.scalar(
                select(func.count(Inspection.id)).where(Inspection.captured_at < cutoff, labelled)) or 0)
        result.orphans_deleted = self.sweep_orphans(now)
        self.last_result = result
        log.info("retention (%d days): %s", self.retention_days, result)
        return result

    def _delete_files(self, relatives: Iterable[str | None]) -> int:
        removed = 0
        for relative in relatives:
            if not relative:
                continue
            try:
                path = self.store.path(relative)
            except ValueError:
                log.warning("retention: stored artifact path %r is outside the store; not deleted", relative)
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
            self._remove_empty_parents(path.parent)
        return removed

    def _remove_empty_parents(self, directory: Path) -> None:
        root = Path(self.store.root).resolve()
        directory = directory.resolve()
        while directory != root and directory.is_relative_to(root):
            try:
                directory.rmdir()  # only succeeds when empty
            except OSError:
                return
            directory = directory.parent

    # --- orphans -------------------------------------------------------------------------------------------------

    def sweep_orphans(self, now: datetime | None = None) -> int:
        """Delete artifact files no row references, older than the grace period; returns how many."""
        limit = (now or datetime.now(timezone.utc)).timestamp() - self.orphan_grace_s
        root = Path(self.store.root).resolve()
        by_directory: dict[Path, list[Path]] = {}
        for path in root.rglob("*"):
            if path.name.startswith(".") or not path.name.endswith(ARTIFACT_SUFFIXES):
                continue
            try:
                if not path.is_file() or path.is_symlink() or path.stat().st_mtime >= limit:
                    continue
            except OSError:
                continue
            by_directory.setdefault(path.parent, []).append(path)
        removed = 0
        for directory, files in by_directory.items():
            prefix = directory.relative_to(root).as_posix() + "/"
            referenced = self._referenced(prefix)
            for path in files:
                if path.relative_to(root).as_posix() in referenced:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
                    log.info("retention: removed orphan artifact %s", path)
            self._remove_empty_parents(directory)
        return removed

    def _referenced(self, prefix: str) -> set[str]:
        """Stored paths under directory `prefix` ("2024/05/01/") from inspection and label rows."""
        pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        columns = (Inspection.mask_path, Inspection.heatmap_path, Inspection.frame_path)
        found: set[str] = set()
        with self.sessions() as session:
            for row in session.execute(
                select(*columns).where(or_(*(column.like(pattern, escape="\\") for column in columns)))
            ):
                found.update(path for path in row if path)
            found.update(session.scalars(select(Label.mask_path).where(Label.mask_path.like(pattern, escape="\\"))))
        return found

    # --- background ----------------------------------------------------------------------------------------------

    def start(self, interval_s: float = 3600.0, initial_delay_s: float = 60.0) -> None:
        """Run every `interval_s` in a daemon thread (first run after `initial_delay_s`); errors are logged."""
        if self._thread is not None:
            return
        self._stop.clear()

        def loop() -> None:
            delay = initial_delay_s
            while not self._stop.wait(delay):
                started = time.monotonic()
                try:
                    self.run_once()
                    self.last_error = None
                except Exception as exc:
                    self.last_error = str(exc).splitlines()[0][:300] if str(exc) else repr(exc)
                    log.exception("retention run failed (retried in %.0f s)", interval_s)
                delay = max(1.0, interval_s - (time.monotonic() - started))

        self._thread = threading.Thread(target=loop, name="retention", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
