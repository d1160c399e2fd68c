"""Calibrated thresholds per source and model version (issue 13).

Revision ID: 0002_source_thresholds
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002_source_thresholds'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('source_thresholds',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('source', sa.String(length=128), nullable=False),
    sa.Column('model_version', sa.String(length=255), nullable=False),
    sa.Column('threshold', sa.Float(), nullable=False),
    sa.Column('pixel_threshold', sa.Float(), nullable=False),
    sa.Column('false_reject_rate', sa.Float(), nullable=False),
    sa.Column('n_frames', sa.Integer(), nullable=False),
    sa.Column('method', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_source_thresholds')),
    sa.UniqueConstraint('source', 'model_version', name='uq_source_thresholds_source_version')
    )


def downgrade() -> None:
    op.drop_table('source_thresholds')
