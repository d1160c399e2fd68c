"""SQLAlchemy 2 typed ORM models: the daemon's tables (`adapters.db.schema`) as classes, for the code that writes.

Each class is mapped onto its Core table in `adapters.db.schema` (declarative with an imperative table); the
`Mapped[...]` annotations give the attributes' types. The history queries select from the Core tables, so that
reading the history needs no ORM (the operator commands start faster).

The annotations are evaluated (no `from __future__ import annotations`): SQLAlchemy then reads the `Mapped[...]`
types as objects instead of parsing and evaluating each one as a string.
"""

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, event, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Mapper, relationship

from adapters.db import schema
from adapters.db.schema import NAMING_CONVENTION, UtcDateTime, utcnow  # noqa: F401  (imported from here too)

# pg_advisory_xact_lock key of the outbox numbering (any constant no other code uses: "anomalyd" in ASCII hex)
OUTBOX_LOCK_KEY = 0x616E6F6D616C7964


class Base(DeclarativeBase):
    metadata = schema.metadata


class Inspection(Base):
    """One scored frame (or a frame that failed in the model: `error` set, no score)."""

    __table__ = schema.inspections

    id: Mapped[int]
    uuid: Mapped[str]
    frame_id: Mapped[str]
    source: Mapped[str]
    line: Mapped[str]
    frame_name: Mapped[str | None]
    captured_at: Mapped[datetime]
    processed_at: Mapped[datetime]
    model_version: Mapped[str]
    score: Mapped[float | None]
    threshold: Mapped[float]
    is_anomalous: Mapped[bool | None]  # None: no decision (adapters.db.schema)
    regions: Mapped[list[dict[str, Any]]]
    mask_path: Mapped[str | None]
    heatmap_path: Mapped[str | None]
    frame_path: Mapped[str | None]
    width: Mapped[int | None]
    height: Mapped[int | None]
    error: Mapped[str | None]
    meta: Mapped[dict[str, Any] | None]

    labels: Mapped[list["Label"]] = relationship(back_populates="inspection", order_by="Label.created_at")

    def __repr__(self) -> str:
        return f"Inspection(id={self.id}, frame_id={self.frame_id!r}, score={self.score}, anomalous={self.is_anomalous})"


@event.listens_for(Inspection, "init")
def _judged_normal_unless_said(_target: Inspection, _args: tuple, kwargs: dict[str, Any]) -> None:
    """`Inspection(...)` without `is_anomalous` is a normal frame; an explicit None (no decision) stays NULL."""
    kwargs.setdefault("is_anomalous", False)


class Label(Base):
    """Operator feedback on an inspection; the latest label wins."""

    __table__ = schema.labels

    id: Mapped[int]
    inspection_id: Mapped[int]
    label: Mapped[str]  # normal | anomalous
    mask_path: Mapped[str | None]
    author: Mapped[str | None]
    created_at: Mapped[datetime]

    inspection: Mapped[Inspection] = relationship(back_populates="labels")


class ModelVersion(Base):
    __table__ = schema.model_versions

    id: Mapped[int]
    version: Mapped[str]
    kind: Mapped[str]  # anomalyclip | adaclip | clip | winclip
    prompts_path: Mapped[str | None]
    metrics: Mapped[dict[str, Any] | None]
    status: Mapped[str]  # candidate|active|retired
    created_at: Mapped[datetime]
    activated_at: Mapped[datetime | None]
    notes: Mapped[str | None]


class TrainingRun(Base):
    __table__ = schema.training_runs

    id: Mapped[int]
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    status: Mapped[str]  # running|succeeded|failed|cancelled
    params: Mapped[dict[str, Any] | None]
    metrics: Mapped[dict[str, Any] | None]
    candidate_version: Mapped[str | None]
    promoted: Mapped[bool]
    log: Mapped[str | None]


class OutboxMessage(Base):
    """One neutral event waiting for the sinks (adapters/events.py): `event_type` and its sink-independent `body`;
    `id` is the message id consumers dedupe on, `seq` the delivery order (each sink's cursor: `SinkCursor`)."""

    __table__ = schema.outbox

    id: Mapped[str]
    seq: Mapped[int]  # delivery order: numbered on insert (`next_outbox_seq`)
    event_type: Mapped[str]  # inspection | threshold | drift | result | mqtt (a row written before migration 0007)
    body: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    inspection_id: Mapped[int | None]


class SinkCursor(Base):
    """Where one sink is in the outbox: every row up to `seq` is delivered to it (or filtered out by it)."""

    __table__ = schema.sink_cursors

    sink: Mapped[str]  # mqtt | webhook:<name> | opcua
    seq: Mapped[int]
    updated_at: Mapped[datetime]


class OpcUaCounterReset(Base):
    """A source's last `ResetCounters` on OPC UA: its counters count what came after these marks."""

    __table__ = schema.opcua_counter_resets

    source: Mapped[str]
    inspection_id: Mapped[int]  # inspections with a higher id count
    seq: Mapped[int]  # trigger answers (outbox rows) with a higher seq count
    reset_at: Mapped[datetime]


def lock_outbox(connection: Connection) -> None:
    """Take the outbox's numbering lock for the rest of the transaction of `connection` (once per transaction).

    A transaction that writes outbox rows and also updates other rows (a drift's) takes it first, so that every
    transaction takes its locks in one order (this one, then rows): no deadlock with a writer that holds it.
    """
    transaction = connection.get_transaction()
    if connection.info.get("outbox_lock") is transaction:
        return
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": OUTBOX_LOCK_KEY})
    else:
        connection.execute(text("UPDATE outbox SET seq = seq WHERE 0 = 1"))  # takes SQLite's write lock
    connection.info["outbox_lock"] = transaction


def next_outbox_seq(connection: Connection) -> int:
    """The next outbox sequence number, in the transaction of `connection`; seq order is commit order.

    Every sink keeps one cursor (the last seq it delivered), so a row must never become visible after a row with a
    higher seq: the transaction that numbers a row holds a lock until it commits (`lock_outbox`), and the next
    writer numbers its rows only after that. PostgreSQL: a transaction-level advisory lock, then the `outbox_seq`
    sequence (a rolled back transaction leaves a gap, which no cursor waits for). SQLite: its write lock, then one
    more than the largest number; rows numbered in the same transaction count on from the last one.
    """
    lock_outbox(connection)
    if connection.dialect.name == "postgresql":
        return int(connection.scalar(schema.outbox_sequence.next_value()))
    transaction = connection.get_transaction()
    numbered = connection.info.get("outbox_seq")
    if numbered is not None and numbered[0] is transaction:
        value = numbered[1] + 1
    else:
        value = int(connection.scalar(select(func.coalesce(func.max(schema.outbox.c.seq), 0)))) + 1
    connection.info["outbox_seq"] = (transaction, value)
    return value


@event.listens_for(OutboxMessage, "before_insert")
def _number_outbox_row(_mapper: Mapper, connection: Connection, row: OutboxMessage) -> None:
    if row.seq is None:
        row.seq = next_outbox_seq(connection)


class RejectedFrame(Base):
    """A frame that could not be inspected (undecodable, empty, ...), with the reason."""

    __table__ = schema.rejected_frames

    id: Mapped[int]
    source: Mapped[str]
    frame_id: Mapped[str | None]
    name: Mapped[str | None]
    reason: Mapped[str]
    created_at: Mapped[datetime]


class SourceThreshold(Base):
    """Calibrated thresholds of one source for one model version (daemon/references/manager.py, `anomalyd calibrate`).

    Keyed by version so that activating another version (or another reference set, which is part of the
    version a source's frames are scored with) never keeps a stale threshold.
    """

    __table__ = schema.source_thresholds

    id: Mapped[int]
    source: Mapped[str]
    model_version: Mapped[str]
    threshold: Mapped[float]
    pixel_threshold: Mapped[float]
    false_reject_rate: Mapped[float]
    n_frames: Mapped[int]
    method: Mapped[str]  # leave-one-out references | labelled normals | cli
    created_at: Mapped[datetime]


class ThresholdChange(Base):
    """One change of a source's thresholds (daemon/references/thresholds.py): applied, proposed, pinned or unpinned."""

    __table__ = schema.threshold_history

    id: Mapped[int]
    source: Mapped[str]
    model_version: Mapped[str]
    action: Mapped[str]
    threshold: Mapped[float]
    pixel_threshold: Mapped[float | None]
    rule: Mapped[str]
    false_reject_rate: Mapped[float | None]
    n_good: Mapped[int | None]
    n_anomalous: Mapped[int | None]
    missed_anomalous: Mapped[int | None]
    set_by: Mapped[str]
    created_at: Mapped[datetime]


class WebhookEndpoint(Base):
    """One configured webhook (by its name) and its counters; its place in the outbox is the `SinkCursor`
    `webhook:<name>`."""

    __table__ = schema.webhook_endpoints

    name: Mapped[str]
    url: Mapped[str]
    registered_at: Mapped[datetime]
    delivered: Mapped[int]
    failures: Mapped[int]
    last_error: Mapped[str | None]
    last_attempt_at: Mapped[datetime | None]
    last_success_at: Mapped[datetime | None]


class DriftEvent(Base):
    """A drift of one source (daemon/zero_label/drift.py): from its start to its end (`cleared_at`)."""

    __table__ = schema.drift_events

    id: Mapped[int]
    uuid: Mapped[str]
    source: Mapped[str]
    line: Mapped[str]
    model_version: Mapped[str]
    started_at: Mapped[datetime]
    detected_at: Mapped[datetime]
    frames: Mapped[int]
    share: Mapped[float]
    suppressed: Mapped[int]
    cleared_at: Mapped[datetime | None]
    cleared_reason: Mapped[str | None]
    created_at: Mapped[datetime]
