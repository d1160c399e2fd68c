"""SQLAlchemy 2 typed ORM models: the daemon's tables.

Times are stored as timezone-aware UTC (`DateTime(timezone=True)`); SQLite keeps them as text without an
offset, so `UtcDateTime` puts the UTC zone back on the way out.

The annotations are evaluated (no `from __future__ import annotations`): SQLAlchemy then reads the `Mapped[...]`
types as objects instead of parsing and evaluating each one as a string (a quarter of this module's import time,
which every operator command pays).
"""

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from adapters.timeutil import utc_now

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


utcnow = utc_now  # the column default (one UTC clock: adapters.timeutil)


class UtcDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every backend (naive input is taken as UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Inspection(Base):
    """One scored frame (or a frame that failed in the model: `error` set, no score)."""

    __tablename__ = "inspections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True, default=lambda: str(uuid.uuid4()))
    frame_id: Mapped[str] = mapped_column(String(255), unique=True)
    source: Mapped[str] = mapped_column(String(128))
    line: Mapped[str] = mapped_column(String(128))
    frame_name: Mapped[str | None] = mapped_column(Text)
    captured_at: Mapped[datetime] = mapped_column(UtcDateTime)
    processed_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    model_version: Mapped[str] = mapped_column(String(255))
    score: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    is_anomalous: Mapped[bool] = mapped_column(Boolean, default=False)
    regions: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    mask_path: Mapped[str | None] = mapped_column(Text)
    heatmap_path: Mapped[str | None] = mapped_column(Text)
    frame_path: Mapped[str | None] = mapped_column(Text)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    labels: Mapped[list["Label"]] = relationship(back_populates="inspection", order_by="Label.created_at")

    __table_args__ = (
        Index("ix_inspections_source_captured_at", "source", "captured_at"),
        Index("ix_inspections_line_captured_at", "line", "captured_at"),
        Index("ix_inspections_captured_at", "captured_at"),
        Index("ix_inspections_score", "score"),
        Index("ix_inspections_is_anomalous_captured_at", "is_anomalous", "captured_at"),
    )

    def __repr__(self) -> str:
        return f"Inspection(id={self.id}, frame_id={self.frame_id!r}, score={self.score}, anomalous={self.is_anomalous})"


class Label(Base):
    """Operator feedback on an inspection; the latest label wins."""

    __tablename__ = "labels"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    inspection_id: Mapped[int] = mapped_column(ForeignKey("inspections.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(16))  # normal | anomalous
    mask_path: Mapped[str | None] = mapped_column(Text)
    author: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)

    inspection: Mapped[Inspection] = relationship(back_populates="labels")


class ModelVersion(Base):
    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version: Mapped[str] = mapped_column(String(255), unique=True)
    kind: Mapped[str] = mapped_column(String(32))  # anomalyclip | adaclip | clip | winclip
    prompts_path: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="candidate", index=True)  # candidate|active|retired
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    activated_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    notes: Mapped[str | None] = mapped_column(Text)


class TrainingRun(Base):
    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    status: Mapped[str] = mapped_column(String(16), default="running")  # running|succeeded|failed|cancelled
    params: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    candidate_version: Mapped[str | None] = mapped_column(String(255))
    promoted: Mapped[bool] = mapped_column(Boolean, default=False)
    log: Mapped[str | None] = mapped_column(Text)


class OutboxMessage(Base):
    """An MQTT message waiting for the broker's acknowledgement; `id` is the alert id consumers dedupe on."""

    __tablename__ = "outbox"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=lambda: str(uuid.uuid4()))
    topic: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)  # JSON text, published as is
    qos: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    inspection_id: Mapped[int | None] = mapped_column(ForeignKey("inspections.id", ondelete="SET NULL"))

    __table_args__ = (Index("ix_outbox_sent_at_created_at", "sent_at", "created_at"),
                      Index("ix_outbox_created_at", "created_at"))


class RejectedFrame(Base):
    """A frame that could not be inspected (undecodable, empty, ...), with the reason."""

    __tablename__ = "rejected_frames"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(128))
    frame_id: Mapped[str | None] = mapped_column(String(255))
    name: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)

    __table_args__ = (
        Index("ix_rejected_frames_source_created_at", "source", "created_at"),
        Index("ix_rejected_frames_frame_id", "frame_id"),
    )


class SourceThreshold(Base):
    """Calibrated thresholds of one source for one model version (daemon/references.py, `anomalyd calibrate`).

    Keyed by version so that activating another version (or another reference set, which is part of the
    version a source's frames are scored with) never keeps a stale threshold.
    """

    __tablename__ = "source_thresholds"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(255))
    threshold: Mapped[float] = mapped_column(Float)
    pixel_threshold: Mapped[float] = mapped_column(Float)
    false_reject_rate: Mapped[float] = mapped_column(Float)
    n_frames: Mapped[int] = mapped_column(Integer)
    method: Mapped[str] = mapped_column(String(64))  # leave-one-out references | labelled normals | cli
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)

    __table_args__ = (UniqueConstraint("source", "model_version", name="uq_source_thresholds_source_version"),)


class WebhookEndpoint(Base):
    """Delivery state of one configured webhook (by its name): the outbox rows created before `settled_until`
    are all delivered to it or filtered out; later ones are settled when a `webhook_deliveries` row says so."""

    __tablename__ = "webhook_endpoints"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    registered_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    settled_until: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    delivered: Mapped[int] = mapped_column(Integer, default=0)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_success_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class WebhookDelivery(Base):
    """One outbox row settled for one webhook: `delivered` (a 2xx came back) or `skipped` (filtered out)."""

    __tablename__ = "webhook_deliveries"

    webhook: Mapped[str] = mapped_column(String(128), primary_key=True)
    outbox_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))  # delivered | skipped
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)  # the outbox row's, for pruning
    settled_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    attempts: Mapped[int] = mapped_column(Integer, default=0)

    __table_args__ = (Index("ix_webhook_deliveries_webhook_created_at", "webhook", "created_at"),)
