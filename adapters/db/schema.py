"""The daemon's tables as SQLAlchemy Core `Table`s: what the history queries (`adapters.db.history`) select from.

The ORM classes of `adapters.db.tables` are mapped onto these same tables. Keeping the tables in Core lets the
operator commands that only read the history (`anomalyd defects`, `label`, `models list`, `stats`) run without
importing `sqlalchemy.orm` at all: a fifth of their start-up. A test (`tests/adapters/test_schema.py`) compares
these tables with what the Alembic migrations create.

Times are stored as timezone-aware UTC (`DateTime(timezone=True)`); SQLite keeps them as text without an
offset, so `UtcDateTime` puts the UTC zone back on the way out.
"""

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Sequence,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)

from adapters.timeutil import utc_now

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

utcnow = utc_now  # the column default (one UTC clock: adapters.timeutil)


def _new_uuid() -> str:
    return str(uuid.uuid4())


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


metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _required(name: str, *args: Any, **kwargs: Any) -> Column:
    """A NOT NULL column (the ORM's `Mapped[X]`; `Mapped[X | None]` is a plain, nullable `Column`)."""
    return Column(name, *args, nullable=False, **kwargs)


# One scored frame (or a frame that failed in the model: `error` set, no score). `is_anomalous` NULL: a frame the
# model made no decision on (mutual scoring's window still filling: no score; a would-be alert while the source is
# in drift: its score kept), recorded as such and never as a pass; `meta.no_decision` says why.
inspections = Table(
    "inspections", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _required("uuid", String(36), unique=True, default=_new_uuid),
    _required("frame_id", String(255), unique=True),
    _required("source", String(128)),
    _required("line", String(128)),
    Column("frame_name", Text),
    _required("captured_at", UtcDateTime),
    _required("processed_at", UtcDateTime, default=utcnow),
    _required("model_version", String(255)),
    Column("score", Float),
    _required("threshold", Float),
    # NULL: no decision (migration 0006; daemon/zero_label/drift.py). No column default: the ORM would put it in place of an
    # explicit None; `Inspection()` without it still starts False (adapters.db.tables).
    Column("is_anomalous", Boolean),
    _required("regions", JSON, default=list),
    Column("mask_path", Text),
    Column("heatmap_path", Text),
    Column("frame_path", Text),
    Column("width", Integer),
    Column("height", Integer),
    Column("error", Text),
    Column("meta", JSON),
    Index("ix_inspections_source_captured_at", "source", "captured_at"),
    Index("ix_inspections_line_captured_at", "line", "captured_at"),
    Index("ix_inspections_captured_at", "captured_at"),
    Index("ix_inspections_score", "score"),
    Index("ix_inspections_is_anomalous_captured_at", "is_anomalous", "captured_at"),
)

# Operator feedback on an inspection; the latest label wins.
labels = Table(
    "labels", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _required("inspection_id", Integer, ForeignKey("inspections.id", ondelete="CASCADE"), index=True),
    _required("label", String(16)),  # normal | anomalous
    Column("mask_path", Text),
    Column("author", String(128)),
    _required("created_at", UtcDateTime, default=utcnow, index=True),
)

model_versions = Table(
    "model_versions", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _required("version", String(255), unique=True),
    _required("kind", String(32)),  # the model family: anomalyclip | adaclip | patchcore | ...
    Column("prompts_path", Text),
    Column("metrics", JSON),
    _required("status", String(16), default="candidate", index=True),  # candidate | active | retired
    _required("created_at", UtcDateTime, default=utcnow),
    Column("activated_at", UtcDateTime),
    Column("notes", Text),
)

training_runs = Table(
    "training_runs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _required("started_at", UtcDateTime, default=utcnow),
    Column("finished_at", UtcDateTime),
    _required("status", String(16), default="running"),  # running | succeeded | failed | cancelled
    Column("params", JSON),
    Column("metrics", JSON),
    Column("candidate_version", String(255)),
    _required("promoted", Boolean, default=False),
    Column("log", Text),
)

# The outbox's delivery order on PostgreSQL (several writers); SQLite numbers rows under its write lock
# (adapters.db.tables numbers every new row before its INSERT, under a lock that makes seq order commit order).
outbox_sequence = Sequence("outbox_seq", metadata=metadata)

# What happened, once, for every sink (migration 0007): a neutral event (`event_type` + a sink-independent JSON
# `body`, see adapters/events.py), numbered by `seq`, the order every sink delivers in. Each sink formats its own
# message from it (MQTT topic + payload, webhook body + headers) and keeps its own cursor in `sink_cursors`.
# `id` is the message id consumers dedupe on (the alert id).
outbox = Table(
    "outbox", metadata,
    Column("id", String(36), primary_key=True, default=_new_uuid),
    _required("seq", BigInteger),
    _required("event_type", String(32)),  # inspection | threshold | drift | result | mqtt (rows before 0007)
    _required("body", JSON),
    _required("created_at", UtcDateTime, default=utcnow),
    Column("inspection_id", Integer, ForeignKey("inspections.id", ondelete="SET NULL")),
    Index("ix_outbox_created_at", "created_at"),
    Index("ix_outbox_seq", "seq", unique=True),
)

# Per sink (`mqtt`, `webhook:<name>`, `opcua`): every outbox row up to `seq` is delivered to it (or filtered out or
# applied by it); it delivers the rows after, in `seq` order (migration 0007).
sink_cursors = Table(
    "sink_cursors", metadata,
    Column("sink", String(160), primary_key=True),
    _required("seq", BigInteger, default=0),
    _required("updated_at", UtcDateTime, default=utcnow),
)

# The OPC UA sink's `ResetCounters` per source (migration 0008): its counters count the inspections after
# `inspection_id` and the trigger answers after outbox row `seq`, so they survive a restart (adapters/opcua_view.py).
opcua_counter_resets = Table(
    "opcua_counter_resets", metadata,
    Column("source", String(128), primary_key=True),
    _required("inspection_id", BigInteger, default=0),
    _required("seq", BigInteger, default=0),
    _required("reset_at", UtcDateTime, default=utcnow),
)

# A frame that could not be inspected (undecodable, empty, ...), with the reason.
rejected_frames = Table(
    "rejected_frames", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _required("source", String(128)),
    Column("frame_id", String(255)),
    Column("name", Text),
    _required("reason", Text),
    _required("created_at", UtcDateTime, default=utcnow),
    Index("ix_rejected_frames_source_created_at", "source", "created_at"),
    Index("ix_rejected_frames_frame_id", "frame_id"),
)

# Calibrated thresholds of one source for one model version (daemon/references/manager.py, `anomalyd calibrate`).
source_thresholds = Table(
    "source_thresholds", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _required("source", String(128)),
    _required("model_version", String(255)),
    _required("threshold", Float),
    _required("pixel_threshold", Float),
    _required("false_reject_rate", Float),
    _required("n_frames", Integer),
    _required("method", String(64)),  # leave-one-out references | labelled normals | cli
    _required("created_at", UtcDateTime, default=utcnow),
    UniqueConstraint("source", "model_version", name="uq_source_thresholds_source_version"),
)

# Every change of a source's thresholds (daemon/references/thresholds.py): calibrated, applied, proposed (not applied because
# it would miss more labelled defects), pinned and unpinned by an operator; the newest pin/unpin row says whether
# the source is pinned. Migration 0005.
threshold_history = Table(
    "threshold_history", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _required("source", String(128)),
    _required("model_version", String(255)),
    _required("action", String(16)),  # applied | proposed | kept | pinned | unpinned
    _required("threshold", Float),
    Column("pixel_threshold", Float),
    _required("rule", Text),
    Column("false_reject_rate", Float),
    Column("n_good", Integer),
    Column("n_anomalous", Integer),
    Column("missed_anomalous", Integer),
    _required("set_by", String(128)),
    _required("created_at", UtcDateTime, default=utcnow),
    Index("ix_threshold_history_source_id", "source", "id"),
)

# One configured webhook (by its name) and its counters; where it is in the outbox is its `sink_cursors` row
# (`webhook:<name>`).
webhook_endpoints = Table(
    "webhook_endpoints", metadata,
    Column("name", String(128), primary_key=True),
    _required("url", Text),
    _required("registered_at", UtcDateTime, default=utcnow),
    _required("delivered", Integer, default=0),
    _required("failures", Integer, default=0),
    Column("last_error", Text),
    Column("last_attempt_at", UtcDateTime),
    Column("last_success_at", UtcDateTime),
)

# A drift of one source (daemon/zero_label/drift.py, migration 0006): mutual scoring's drift watch saw the whole frame change
# (a new variant, a moved camera, new light) from `started_at` (the first frame of the excursion) and signalled it at
# `detected_at`; `cleared_at` when it ended (the frames match the window again, new references, a restart).
drift_events = Table(
    "drift_events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _required("uuid", String(36), unique=True, default=_new_uuid),  # the message id consumers dedupe on
    _required("source", String(128)),
    _required("line", String(128)),
    _required("model_version", String(255)),
    _required("started_at", UtcDateTime),
    _required("detected_at", UtcDateTime),
    _required("frames", Integer),  # from the start to the signal, both included
    _required("share", Float),  # mean share of unmatched patches over those frames
    _required("suppressed", Integer, default=0),  # alerts held back (recorded as no decision) while it lasted
    Column("cleared_at", UtcDateTime),
    Column("cleared_reason", Text),
    _required("created_at", UtcDateTime, default=utcnow),
    Index("ix_drift_events_source_id", "source", "id"),
)
