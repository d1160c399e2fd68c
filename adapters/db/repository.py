"""Repository functions: the only place that writes the daemon's rows.

Every function takes a `Session` (the caller owns the transaction) except `save_inspection(s)`, which own their
transaction because writing a result is exactly one: the inspection row plus, when anomalous, its outbox alert (an `inspection` event,
adapters/events.py). The outbox's own functions (events, the sinks' cursors) are in adapters/db/outbox.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from adapters.db.outbox import add_event
from adapters.db.queries import (  # noqa: F401  (the history filters: Core, shared with adapters.db.history)
    InspectionFilter,
    inspection_filter_clauses,
    latest_label_subquery,
)
from adapters.db.tables import Inspection, Label, ModelVersion, OutboxMessage, RejectedFrame

# Builds the alert of a flushed inspection (its id is known): (event type, neutral body) of its outbox event
# (adapters/events.py), or None for no alert.
AlertBuilder = Callable[[Inspection], "tuple[str, dict[str, Any]] | None"]


@dataclass
class SavedInspection:
    inspection: Inspection
    alert: OutboxMessage | None
    created: bool  # False: the frame_id was already recorded; `inspection` is the existing row


# --- values that fit their columns ------------------------------------------------------------------------------
# Inputs decide these strings (file names, topics, producers' ids): a value the database refuses (too long for
# its column on PostgreSQL, a NUL byte, an undecodable file name) would make its frame fail and be retried forever.


def clean_text(value: str | None) -> str | None:
    """Text any database takes: lone surrogates (undecodable file names) escaped, NUL bytes dropped."""
    if value is None:
        return None
    value = str(value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        try:  # the original bytes of an undecodable file name, shown as \xNN escapes
            value = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value.replace("\0", "")


def fit_text(value: str | None, limit: int) -> str | None:
    """`clean_text`, cut to `limit` characters (for descriptive columns: line, model version)."""
    value = clean_text(value)
    return value if value is None or len(value) <= limit else value[: limit - 1] + "…"


def fit_key(value: str | None, limit: int) -> str | None:
    """An identifying value (frame_id, source) that fits `limit` characters and stays distinct and stable: an
    over-long or unclean one becomes its first characters + "~" + a hash of the whole value."""
    if value is None:
        return None
    cleaned = clean_text(value)
    if cleaned == value and len(value) <= limit:
        return value
    digest = hashlib.sha1(str(value).encode("utf-8", "surrogatepass")).hexdigest()
    return f"{cleaned[: limit - len(digest) - 1]}~{digest}"


def column_limit(column: Any) -> int:
    return int(getattr(column.property.columns[0].type, "length", None) or 1_000_000)


def fit_inspection(inspection: Inspection) -> Inspection:
    """Fit the row's strings to their columns (in place); see `fit_key` / `fit_text`."""
    inspection.frame_id = fit_key(inspection.frame_id, column_limit(Inspection.frame_id))
    inspection.source = fit_key(inspection.source, column_limit(Inspection.source))
    inspection.line = fit_text(inspection.line, column_limit(Inspection.line))
    inspection.model_version = fit_text(inspection.model_version, column_limit(Inspection.model_version))
    for name in ("frame_name", "error", "mask_path", "heatmap_path", "frame_path"):
        setattr(inspection, name, clean_text(getattr(inspection, name)))
    return inspection


def inspection_by_frame_id(session: Session, frame_id: str) -> Inspection | None:
    frame_id = fit_key(frame_id, column_limit(Inspection.frame_id))
    return session.scalars(select(Inspection).where(Inspection.frame_id == frame_id)).one_or_none()


def inspections_by_frame_ids(session: Session, frame_ids: Sequence[str]) -> dict[str, Inspection]:
    """The rows already recorded for these frame_ids, by the frame_id asked for."""
    if not frame_ids:
        return {}
    limit = column_limit(Inspection.frame_id)
    asked = {fit_key(frame_id, limit): frame_id for frame_id in frame_ids}
    rows = session.scalars(select(Inspection).where(Inspection.frame_id.in_(list(asked))))
    return {asked.get(row.frame_id, row.frame_id): row for row in rows}


def recorded_frame_ids(session: Session, source: str, prefix: str, limit: int = 256) -> list[str]:
    """The frame_ids of `source` starting with `prefix` already in the database (inspections and rejected
    frames), the newest rows first, at most `limit` of each: a video source resumes after the last of them."""
    ids: list[str] = []
    for table in (Inspection, RejectedFrame):
        query = (select(table.frame_id).where(table.source == source, table.frame_id.startswith(prefix, autoescape=True))
                 .order_by(table.id.desc()).limit(limit))
        ids.extend(frame_id for frame_id in session.scalars(query) if frame_id)
    return ids


def alert_for_inspection(session: Session, inspection_id: int) -> OutboxMessage | None:
    return session.scalars(
        select(OutboxMessage).where(OutboxMessage.inspection_id == inspection_id).order_by(OutboxMessage.seq)
    ).first()


def _add_alert(session: Session, inspection: Inspection, alert: AlertBuilder | None) -> OutboxMessage | None:
    """The outbox event of a flushed inspection's alert (added to the session), or None when it raises none."""
    built = alert(inspection) if alert is not None else None
    if built is None:
        return None
    event_type, body = built
    return add_event(session, event_type, body, inspection_id=inspection.id)


def save_inspection(
    sessions: sessionmaker[Session], inspection: Inspection, alert: AlertBuilder | None = None
) -> SavedInspection:
    """Insert `inspection` and its alert in one transaction; idempotent on `frame_id`.

    A frame_id already present (a redelivered frame, or a concurrent writer winning the race) returns the
    existing row with created=False and writes nothing.
    """
    fit_inspection(inspection)
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
    for inspection, _ in items:
        fit_inspection(inspection)
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
    source = fit_key(source, column_limit(RejectedFrame.source))
    frame_id = fit_key(frame_id, column_limit(RejectedFrame.frame_id))
    name, reason = clean_text(name), clean_text(reason)
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


# --- queries for the operator API and CLI --------------------------------------------------------------------------


def latest_label(session: Session, inspection_id: int) -> Label | None:
    return session.scalars(
        select(Label).where(Label.inspection_id == inspection_id).order_by(Label.created_at.desc(), Label.id.desc())
    ).first()


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
