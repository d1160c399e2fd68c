"""Repository functions: the only place that writes the daemon's rows.

Every function takes a `Session` (the caller owns the transaction) except `save_inspection(s)`, which own their
transaction because writing a result is exactly one: the inspection row plus, when anomalous, its outbox alert.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from adapters.db.tables import Inspection, Label, ModelVersion, OutboxMessage, RejectedFrame, utcnow

# Builds the alert for a flushed inspection (its id is known): (topic, payload dict, qos), or None for no alert.
AlertBuilder = Callable[[Inspection], "tuple[str, dict[str, Any], int] | None"]


@dataclass
class SavedInspection:
    inspection: Inspection
    alert: OutboxMessage | None
    created: bool  # False: the frame_id was already recorded; `inspection` is the existing row


def inspection_by_frame_id(session: Session, frame_id: str) -> Inspection | None:
    return session.scalars(select(Inspection).where(Inspection.frame_id == frame_id)).one_or_none()


def inspections_by_frame_ids(session: Session, frame_ids: Sequence[str]) -> dict[str, Inspection]:
    """The rows already recorded for these frame_ids, by frame_id."""
    if not frame_ids:
        return {}
    rows = session.scalars(select(Inspection).where(Inspection.frame_id.in_(list(frame_ids))))
    return {row.frame_id: row for row in rows}


def alert_for_inspection(session: Session, inspection_id: int) -> OutboxMessage | None:
    return session.scalars(
        select(OutboxMessage).where(OutboxMessage.inspection_id == inspection_id).order_by(OutboxMessage.created_at)
    ).first()


def _add_alert(session: Session, inspection: Inspection, alert: AlertBuilder | None) -> OutboxMessage | None:
    """The outbox row of a flushed inspection's alert (added to the session), or None when it raises none."""
    built = alert(inspection) if alert is not None else None
    if built is None:
        return None
    topic, payload, qos = built
    message = OutboxMessage(id=str(payload["id"]), topic=topic, payload=json.dumps(payload, separators=(",", ":")),
                            qos=qos, inspection_id=inspection.id)
    session.add(message)
    return message


def save_inspection(
    sessions: sessionmaker[Session], inspection: Inspection, alert: AlertBuilder | None = None
) -> SavedInspection:
    """Insert `inspection` and its alert in one transaction; idempotent on `frame_id`.

    A frame_id already present (a redelivered frame, or a concurrent writer winning the race) returns the
    existing row with created=False and writes nothing.
    """
    with sessions() as session:
        try:
            with session.begin():
                existing = inspection_by_frame_id(session, inspection.frame_id)
                if existing is not None:
                    return SavedInspection(existing, alert_for_inspection(session, existing.id), created=False)
                session.add(inspection)
                session.flush()  # assigns inspection.id, needed in the alert payload
                message = _add_alert(session, inspection, alert)
            return SavedInspection(inspection, message, created=True)
        except IntegrityError:
            # Another writer committed the same frame_id between our check and insert.
            with session.begin():
                existing = inspection_by_frame_id(session, inspection.frame_id)
                if existing is None:
                    raise
                return SavedInspection(existing, alert_for_inspection(session, existing.id), created=False)


def save_inspections(
    sessions: sessionmaker[Session], items: Sequence[tuple[Inspection, AlertBuilder | None]]
) -> list[SavedInspection]:
    """Several results in one transaction (a writer's batch): one query for frame_ids already recorded, then the
    new inspections and their alerts. Same outcome per item as `save_inspection`, a fraction of the round trips.

    All or nothing: when it raises, nothing was written; the caller may then save the items one by one (a
    concurrent writer that took one frame_id, or one bad row, must not hold back the others).
    """
    if len(items) == 1:
        return [save_inspection(sessions, *items[0])]
    with sessions() as session, session.begin():
        frame_ids = [inspection.frame_id for inspection, _ in items]
        known = inspections_by_frame_ids(session, frame_ids)
        added: list[tuple[Inspection, AlertBuilder | None]] = []
        for inspection, alert in items:
            if inspection.frame_id not in known:
                session.add(inspection)
                known[inspection.frame_id] = inspection
                added.append((inspection, alert))
        session.flush()  # assigns the ids the alert payloads carry
        messages = {inspection.frame_id: _add_alert(session, inspection, alert) for inspection, alert in added}
        results = []
        for inspection, _ in items:
            row = known[inspection.frame_id]  # this item's row, or the one recorded before / earlier in the batch
            alert = messages[row.frame_id] if row.frame_id in messages else alert_for_inspection(session, row.id)
            results.append(SavedInspection(row, alert, created=row is inspection))
    return results


def record_rejected(
    sessions: sessionmaker[Session], *, source: str, frame_id: str | None, name: str | None, reason: str
) -> tuple[RejectedFrame, bool]:
    """A rejected frame row; a redelivered frame_id already rejected for this source is not recorded twice."""
    with sessions() as session, session.begin():
        if frame_id is not None:
            existing = session.scalars(
                select(RejectedFrame).where(RejectedFrame.source == source, RejectedFrame.frame_id == frame_id)
            ).first()
            if existing is not None:
                return existing, False
        row = RejectedFrame(source=source, frame_id=frame_id, name=name, reason=reason[:4000])
        session.add(row)
    return row, True


# --- outbox ------------------------------------------------------------------------------------------------------


def pending_outbox(session: Session, limit: int = 100, exclude: Iterable[str] = ()) -> Sequence[OutboxMessage]:
    """Unsent messages, oldest first, skipping ids already in flight."""
    query = select(OutboxMessage).where(OutboxMessage.sent_at.is_(None))
    excluded = list(exclude)
    if excluded:
        query = query.where(OutboxMessage.id.not_in(excluded))
    return session.scalars(query.order_by(OutboxMessage.created_at, OutboxMessage.id).limit(limit)).all()


def count_pending_outbox(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(OutboxMessage).where(OutboxMessage.sent_at.is_(None))) or 0


def mark_outbox_sent(session: Session, ids: Iterable[str], when: datetime | None = None) -> int:
    ids = list(ids)
    if not ids:
        return 0
    result = session.execute(
        update(OutboxMessage)
        .where(OutboxMessage.id.in_(ids), OutboxMessage.sent_at.is_(None))
        .values(sent_at=when or utcnow())
    )
    return result.rowcount or 0


def add_outbox_attempts(session: Session, ids: Iterable[str]) -> None:
    ids = list(ids)
    if ids:
        session.execute(
            update(OutboxMessage).where(OutboxMessage.id.in_(ids)).values(attempts=OutboxMessage.attempts + 1)
        )


# --- queries for the operator API and CLI --------------------------------------------------------------------------


@dataclass
class InspectionFilter:
    source: str | None = None
    line: str | None = None
    after: datetime | None = None  # captured_at >= after
    before: datetime | None = None  # captured_at < before
    min_score: float | None = None
    max_score: float | None = None
    anomalous: bool | None = None
    label: str | None = None  # latest label: normal | anomalous | "none" (unlabelled)


def latest_label(session: Session, inspection_id: int) -> Label | None:
    return session.scalars(
        select(Label).where(Label.inspection_id == inspection_id).order_by(Label.created_at.desc(), Label.id.desc())
    ).first()


def latest_label_subquery() -> Any:
    """The label of an inspection's newest label row, as a correlated scalar subquery (None when unlabelled)."""
    return (
        select(Label.label)
        .where(Label.inspection_id == Inspection.id)
        .order_by(Label.created_at.desc(), Label.id.desc())
        .limit(1)
        .correlate(Inspection)
        .scalar_subquery()
    )


def inspection_filter_clauses(filters: InspectionFilter) -> list[Any]:
    """WHERE clauses for `filters`: the one definition of the history filters (API, CLI, this module)."""
    if filters.label is not None and filters.label not in ("normal", "anomalous", "none"):
        raise ValueError(f"label filter must be normal, anomalous or none, not {filters.label!r}")
    checks = [
        (filters.source, lambda v: Inspection.source == v),
        (filters.line, lambda v: Inspection.line == v),
        (filters.after, lambda v: Inspection.captured_at >= v),
        (filters.before, lambda v: Inspection.captured_at < v),
        (filters.min_score, lambda v: Inspection.score >= v),
        (filters.max_score, lambda v: Inspection.score <= v),
        (filters.anomalous, lambda v: Inspection.is_anomalous.is_(v)),
        (filters.label, lambda v: latest_label_subquery().is_(None) if v == "none" else latest_label_subquery() == v),
    ]
    return [clause(value) for value, clause in checks if value is not None]


def list_inspections(
    session: Session, filters: InspectionFilter | None = None, limit: int = 50, before_id: int | None = None
) -> list[Inspection]:
    """Newest first (by id, which follows insertion); `before_id` is the keyset cursor (id of the last row seen)."""
    query = select(Inspection).where(*inspection_filter_clauses(filters or InspectionFilter()))
    if before_id is not None:
        query = query.where(Inspection.id < before_id)
    return list(session.scalars(query.order_by(Inspection.id.desc()).limit(limit)))


def add_label(
    session: Session, inspection_id: int, label: str, *, author: str | None = None, mask_path: str | None = None
) -> Label:
    if label not in ("normal", "anomalous"):
        raise ValueError(f"label must be 'normal' or 'anomalous', not {label!r}")
    row = Label(inspection_id=inspection_id, label=label, author=author, mask_path=mask_path)
    session.add(row)
    session.flush()
    return row


def active_model_version(session: Session) -> ModelVersion | None:
    return session.scalars(
        select(ModelVersion).where(ModelVersion.status == "active").order_by(ModelVersion.activated_at.desc())
    ).first()
