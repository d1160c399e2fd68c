"""Neutral outbox events and per-sink cursors (issue 22).

- `outbox` stores what happened: `event_type` and a sink-independent JSON `body` (adapters/events.py) in place of
  the MQTT message (`topic`, `payload`, `qos`, `retain`) and MQTT's delivery state (`sent_at`, `attempts`). The
  rows already there become `mqtt` events whose body is that message (`topic`, `payload`, `qos`, `retain`): MQTT
  and the webhooks deliver them exactly as before.
- `sink_cursors(sink, seq)`: every row up to `seq` is delivered to the sink. MQTT's starts before its oldest
  unacknowledged row (rows acknowledged after it are published again; consumers dedupe on `id`); a webhook's
  before its oldest unsettled row (`webhook_endpoints.settled_until` and `webhook_deliveries`, both dropped).

Revision ID: 0007_neutral_outbox
Revises: 0006_drift_no_decision
Create Date: 2026-12-07
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = '0007_neutral_outbox'
down_revision = '0006_drift_no_decision'
branch_labels = None
depends_on = None

_old_outbox = sa.table('outbox', sa.column('id', sa.String), sa.column('seq', sa.BigInteger),
                       sa.column('topic', sa.Text), sa.column('payload', sa.Text), sa.column('qos', sa.Integer),
                       sa.column('retain', sa.Boolean), sa.column('sent_at', sa.DateTime),
                       sa.column('created_at', sa.DateTime), sa.column('event_type', sa.String),
                       sa.column('body', sa.JSON))
_cursors = sa.table('sink_cursors', sa.column('sink', sa.String), sa.column('seq', sa.BigInteger),
                    sa.column('updated_at', sa.DateTime(timezone=True)))


def upgrade() -> None:
    bind = op.get_bind()
    op.create_table('sink_cursors',
    sa.Column('sink', sa.String(length=160), nullable=False),
    sa.Column('seq', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('sink', name=op.f('pk_sink_cursors'))
    )
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.add_column(sa.Column('event_type', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('body', sa.JSON(), nullable=True))
    o = _old_outbox.c
    rows = bind.execute(sa.select(o.id, o.topic, o.payload, o.qos, o.retain)).all()
    if rows:
        bind.execute(_old_outbox.update().where(o.id == sa.bindparam('row_id'))
                     .values(event_type='mqtt', body=sa.bindparam('legacy', type_=sa.JSON)),
                     [{'row_id': row.id, 'legacy': {'topic': row.topic, 'payload': row.payload, 'qos': int(row.qos),
                                                    'retain': bool(row.retain)}} for row in rows])
    now = sa.func.current_timestamp()
    last = bind.scalar(sa.select(sa.func.coalesce(sa.func.max(o.seq), 0)))
    first_unsent = bind.scalar(sa.select(sa.func.min(o.seq)).where(o.sent_at.is_(None)))
    cursors = {'mqtt': last if first_unsent is None else first_unsent - 1}
    endpoints = sa.table('webhook_endpoints', sa.column('name', sa.String), sa.column('settled_until', sa.DateTime))
    deliveries = sa.table('webhook_deliveries', sa.column('webhook', sa.String), sa.column('outbox_id', sa.String))
    for name, settled_until in bind.execute(sa.select(endpoints.c.name, endpoints.c.settled_until)).all():
        settled = sa.exists().where(deliveries.c.webhook == name, deliveries.c.outbox_id == o.id)
        unsettled = bind.scalar(sa.select(sa.func.min(o.seq)).where(o.created_at >= settled_until, ~settled))
        cursors[f'webhook:{name}'] = last if unsettled is None else unsettled - 1
    for sink, seq in cursors.items():
        bind.execute(_cursors.insert().values(sink=sink, seq=seq, updated_at=now))
    op.drop_index('ix_webhook_deliveries_webhook_created_at', table_name='webhook_deliveries')
    op.drop_table('webhook_deliveries')
    with op.batch_alter_table('webhook_endpoints', schema=None) as batch_op:
        batch_op.drop_column('settled_until')
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.alter_column('event_type', existing_type=sa.String(length=32), nullable=False)
        batch_op.alter_column('body', existing_type=sa.JSON(), nullable=False)
        batch_op.drop_index('ix_outbox_sent_at_created_at')
        batch_op.drop_column('topic')
        batch_op.drop_column('payload')
        batch_op.drop_column('qos')
        batch_op.drop_column('retain')
        batch_op.drop_column('sent_at')
        batch_op.drop_column('attempts')


def downgrade() -> None:
    """Back to MQTT-shaped rows: a neutral event becomes its MQTT message under the default prefix `anomalyd`
    (the prefix is configuration, not stored), marked sent when MQTT's cursor is past it."""
    from adapters.events import OutboxEvent
    from adapters.mqtt import mqtt_message

    bind = op.get_bind()
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.add_column(sa.Column('topic', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('payload', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('qos', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('retain', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('attempts', sa.Integer(), nullable=True))
    o = _old_outbox.c
    mqtt_cursor = bind.scalar(sa.select(_cursors.c.seq).where(_cursors.c.sink == 'mqtt')) or 0
    rows = bind.execute(sa.select(o.id, o.seq, o.event_type, o.body)).all()
    for row in rows:
        body = row.body if isinstance(row.body, dict) else json.loads(row.body)
        message = mqtt_message(OutboxEvent(row.id, row.seq, row.event_type, body), 'anomalyd', 1)
        bind.execute(_old_outbox.update().where(o.id == row.id).values(
            topic=message.topic, payload=message.payload, qos=message.qos, retain=message.retain,
            sent_at=sa.func.current_timestamp() if row.seq <= mqtt_cursor else None))
    op.execute("UPDATE outbox SET attempts = 0")
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.alter_column('topic', existing_type=sa.Text(), nullable=False)
        batch_op.alter_column('payload', existing_type=sa.Text(), nullable=False)
        batch_op.alter_column('qos', existing_type=sa.Integer(), nullable=False)
        batch_op.alter_column('attempts', existing_type=sa.Integer(), nullable=False)
        batch_op.create_index('ix_outbox_sent_at_created_at', ['sent_at', 'created_at'], unique=False)
        batch_op.drop_column('body')
        batch_op.drop_column('event_type')
    with op.batch_alter_table('webhook_endpoints', schema=None) as batch_op:
        batch_op.add_column(sa.Column('settled_until', sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE webhook_endpoints SET settled_until = CURRENT_TIMESTAMP")
    with op.batch_alter_table('webhook_endpoints', schema=None) as batch_op:
        batch_op.alter_column('settled_until', existing_type=sa.DateTime(timezone=True), nullable=False)
    op.create_table('webhook_deliveries',
    sa.Column('webhook', sa.String(length=128), nullable=False),
    sa.Column('outbox_id', sa.String(length=36), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('settled_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('webhook', 'outbox_id', name=op.f('pk_webhook_deliveries'))
    )
    op.create_index('ix_webhook_deliveries_webhook_created_at', 'webhook_deliveries', ['webhook', 'created_at'],
                    unique=False)
    op.drop_table('sink_cursors')
