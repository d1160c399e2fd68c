"""threshold_history: every change of a source's thresholds, with its rule, counts and who set it (issue 19).

Revision ID: 0005_threshold_history
Revises: 0004_outbox_seq
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005_threshold_history'
down_revision = '0004_outbox_seq'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('threshold_history',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('source', sa.String(length=128), nullable=False),
    sa.Column('model_version', sa.String(length=255), nullable=False),
    sa.Column('action', sa.String(length=16), nullable=False),
    sa.Column('threshold', sa.Float(), nullable=False),
    sa.Column('pixel_threshold', sa.Float(), nullable=True),
    sa.Column('rule', sa.Text(), nullable=False),
    sa.Column('false_reject_rate', sa.Float(), nullable=True),
    sa.Column('n_good', sa.Integer(), nullable=True),
    sa.Column('n_anomalous', sa.Integer(), nullable=True),
    sa.Column('missed_anomalous', sa.Integer(), nullable=True),
    sa.Column('set_by', sa.String(length=128), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_threshold_history'))
    )
    with op.batch_alter_table('threshold_history', schema=None) as batch_op:
        batch_op.create_index('ix_threshold_history_source_id', ['source', 'id'], unique=False)


def downgrade() -> None:
    op.drop_table('threshold_history')
