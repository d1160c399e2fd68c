"""The database adapter: ORM models, engine/session factory, Alembic migrations, repository functions.

Typical use::

    engine = make_engine(url); upgrade(engine); sessions = make_session_factory(engine)
    saved = save_inspection(sessions, Inspection(...), alert=builder)
"""

from adapters.db.engine import make_engine, make_session_factory, ping
from adapters.db.repository import (
    InspectionFilter,
    SavedInspection,
    add_label,
    add_outbox_attempts,
    count_pending_outbox,
    inspection_by_frame_id,
    inspections_by_frame_ids,
    latest_label,
    list_inspections,
    mark_outbox_sent,
    pending_outbox,
    record_rejected,
    save_inspection,
    save_inspections,
)
from adapters.db.tables import (
    Base,
    Inspection,
    Label,
    ModelVersion,
    OutboxMessage,
    RejectedFrame,
    SourceThreshold,
    TrainingRun,
    utcnow,
)

__all__ = [
    "Base",
    "Inspection",
    "InspectionFilter",
    "Label",
    "ModelVersion",
    "OutboxMessage",
    "RejectedFrame",
    "SavedInspection",
    "SourceThreshold",
    "TrainingRun",
    "add_label",
    "add_outbox_attempts",
    "count_pending_outbox",
    "current_revision",
    "head_revision",
    "inspection_by_frame_id",
    "inspections_by_frame_ids",
    "latest_label",
    "list_inspections",
    "make_engine",
    "make_session_factory",
    "mark_outbox_sent",
    "pending_outbox",
    "ping",
    "record_rejected",
    "save_inspection",
    "save_inspections",
    "upgrade",
    "utcnow",
]

# Alembic is imported on first use of these (it costs a fifth of a second and logs at import), so code that only
# reads the database, like the operator commands, does without it.
_MIGRATE_NAMES = ("current_revision", "head_revision", "upgrade")


def __getattr__(name: str):
    if name in _MIGRATE_NAMES:
        from adapters.db import migrate

        return getattr(migrate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
