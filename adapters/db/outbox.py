"""The outbox's rows and the sinks' cursors: what the writers add (`add_event`) and what each sink reads.

An outbox row is a neutral event (adapters/events.py) numbered by `seq` (adapters.db.tables.next_outbox_seq: seq
order is commit order). A sink is in the outbox at its cursor (`sink_cursors`): every row up to it is delivered to
the sink (or filtered out by it), the rows after it wait, and it delivers them in `seq` order.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from adapters.db.tables import OutboxMessage, SinkCursor, utcnow
from adapters.events import EVENT_TYPES, OutboxEvent

MQTT_SINK = "mqtt"
OPCUA_SINK = "opcua"  # the OPC UA sink (adapters/sinks/opcua.py): every row up to its cursor is shown


def webhook_sink(name: str) -> str:
    """The cursor name of the webhook `name` (its `[[webhooks]]` key)."""
    return f"webhook:{name}"


def add_event(session: Session, event_type: str, body: dict[str, Any], *, event_id: str | None = None,
              inspection_id: int | None = None) -> OutboxMessage:
    """A new outbox row in the caller's transaction (numbered at its INSERT); `event_id` is the message id
    consumers dedupe on (a fresh one by default)."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown outbox event type {event_type!r}; one of {', '.join(EVENT_TYPES)}")
    row = OutboxMessage(id=event_id or str(uuid.uuid4()), event_type=event_type, body=body,
                        inspection_id=inspection_id)
    session.add(row)
    return row


def as_event(row: OutboxMessage) -> OutboxEvent:
    return OutboxEvent(id=row.id, seq=row.seq, event_type=row.event_type, body=dict(row.body or {}),
                       inspection_id=row.inspection_id)


def sink_cursor(session: Session, sink: str) -> int | None:
    """The last seq delivered to `sink`; None when it has no cursor yet."""
    return session.scalar(select(SinkCursor.seq).where(SinkCursor.sink == sink))


def set_sink_cursor(session: Session, sink: str, seq: int) -> None:
    """Move `sink`'s cursor to `seq` (created when missing; never moved back)."""
    row = session.get(SinkCursor, sink)
    if row is None:
        session.add(SinkCursor(sink=sink, seq=seq, updated_at=utcnow()))
    elif seq > row.seq:
        row.seq, row.updated_at = seq, utcnow()


def reset_sink_cursor(session: Session, sink: str, seq: int) -> None:
    """Put `sink`'s cursor at `seq`, back or forth (a new webhook starts at the newest row)."""
    row = session.get(SinkCursor, sink)
    if row is None:
        session.add(SinkCursor(sink=sink, seq=seq, updated_at=utcnow()))
    else:
        row.seq, row.updated_at = seq, utcnow()


def last_outbox_seq(session: Session) -> int:
    """The newest row's seq (0 when the outbox is empty)."""
    return int(session.scalar(select(func.coalesce(func.max(OutboxMessage.seq), 0))) or 0)


def outbox_after(session: Session, seq: int, limit: int = 100) -> list[OutboxEvent]:
    """Rows after `seq`, in delivery order."""
    rows = session.scalars(select(OutboxMessage).where(OutboxMessage.seq > seq)
                           .order_by(OutboxMessage.seq).limit(limit)).all()
    return [as_event(row) for row in rows]


def pending_outbox(session: Session, limit: int = 100, sink: str = MQTT_SINK) -> Sequence[OutboxMessage]:
    """The rows `sink` has not delivered yet, in delivery order (`seq`)."""
    cursor = sink_cursor(session, sink) or 0
    return session.scalars(select(OutboxMessage).where(OutboxMessage.seq > cursor)
                           .order_by(OutboxMessage.seq).limit(limit)).all()


def count_pending_outbox(session: Session, sink: str = MQTT_SINK) -> int:
    """How many rows `sink` has not delivered yet (MQTT's by default: the alerts not acknowledged by the broker)."""
    cursor = sink_cursor(session, sink) or 0
    return session.scalar(select(func.count()).select_from(OutboxMessage).where(OutboxMessage.seq > cursor)) or 0
