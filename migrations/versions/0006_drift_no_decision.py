"""Drift events and the no-decision verdict (issue 23).

- `inspections.is_anomalous` may be NULL: a frame the model made no decision on (mutual scoring's window still
  filling, or a would-be alert while its source is in drift), never recorded as a pass;
- `outbox.retain`: a message published retained on MQTT (a source's drift state), false for the existing rows;
- `drift_events`: each drift of a source, from its start to its end.

Revision ID: 0006_drift_no_decision
Revises: 0005_threshold_history
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006_drift_no_decision'
down_revision = '0005_threshold_history'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('inspections', schema=None) as batch_op:
        batch_op.alter_column('is_anomalous', existing_type=sa.Boolean(), nullable=True)
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.add_column(sa.Column('retain', sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_table('drift_events',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('uuid', sa.String(length=36), nullable=False),
    sa.Column('source', sa.String(length=128), nullable=False),
    sa.Column('line', sa.String(length=128), nullable=False),
    sa.Column('model_version', sa.String(length=255), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('detected_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('frames', sa.Integer(), nullable=False),
    sa.Column('share', sa.Float(), nullable=False),
    sa.Column('suppressed', sa.Integer(), nullable=False),
    sa.Column('cleared_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('cleared_reason', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_drift_events')),
    sa.UniqueConstraint('uuid', name=op.f('uq_drift_events_uuid'))
    )
    op.create_index('ix_drift_events_source_id', 'drift_events', ['source', 'id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_drift_events_source_id', table_name='drift_events')
    op.drop_table('drift_events')
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_column('retain')
    op.execute("UPDATE inspections SET is_anomalous = false WHERE is_anomalous IS NULL")
    with op.batch_alter_table('inspections', schema=None) as batch_op:
        batch_op.alter_column('is_anomalous', existing_type=sa.Boolean(), nullable=False)
