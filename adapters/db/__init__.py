"""The database adapter: ORM models, engine/session factory, Alembic migrations, repository functions.

Typical use::

    engine = make_engine(url); upgrade(engine); sessions = make_session_factory(engine)
    saved = save_inspection(sessions, Inspection(...), alert=builder)
"""

# Each name is imported from its module on first use (PEP 562), so that `adapters.db.history` (Core only: the
# operator commands' reads) does not pull in the ORM models and `sqlalchemy.orm`, nor Alembic.
_MODULE_OF = {
    **dict.fromkeys(("make_engine", "make_session_factory", "ping"), "engine"),
    "InspectionFilter": "queries",
    **dict.fromkeys(("SavedInspection", "add_label", "inspection_by_frame_id", "inspections_by_frame_ids",
                     "latest_label", "list_inspections", "record_rejected", "save_inspection", "save_inspections"),
                    "repository"),
    **dict.fromkeys(("add_event", "count_pending_outbox", "outbox_after", "pending_outbox", "set_sink_cursor",
                     "sink_cursor"), "outbox"),
    **dict.fromkeys(("Base", "Inspection", "Label", "ModelVersion", "OutboxMessage", "RejectedFrame", "SinkCursor",
                     "SourceThreshold", "TrainingRun", "utcnow"), "tables"),
    **dict.fromkeys(("current_revision", "head_revision", "upgrade"), "migrate"),
}

__all__ = [
    "Base",
    "Inspection",
    "InspectionFilter",
    "Label",
    "ModelVersion",
    "OutboxMessage",
    "RejectedFrame",
    "SavedInspection",
    "SinkCursor",
    "SourceThreshold",
    "TrainingRun",
    "add_event",
    "add_label",
    "count_pending_outbox",
    "current_revision",
    "head_revision",
    "inspection_by_frame_id",
    "inspections_by_frame_ids",
    "latest_label",
    "list_inspections",
    "make_engine",
    "make_session_factory",
    "outbox_after",
    "pending_outbox",
    "ping",
    "record_rejected",
    "save_inspection",
    "save_inspections",
    "set_sink_cursor",
    "sink_cursor",
    "upgrade",
    "utcnow",
]


def __getattr__(name: str):
    module_name = _MODULE_OF.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module_name}"), name)
    globals()[name] = value  # once found, a plain attribute
    return value
