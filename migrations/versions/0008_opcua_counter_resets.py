"""The OPC UA sink's counter resets (issue 22): `opcua_counter_resets(source, inspection_id, seq, reset_at)`.

The OPC UA sink follows the outbox with its own cursor (`sink_cursors` row `opcua`) and rebuilds its counters
from the database at start; a source's `ResetCounters` is stored here, so a restart counts from the reset on (the
inspections after `inspection_id`, the trigger answers after outbox row `seq`) instead of from the first row.

Revision ID: 0008_opcua_counter_resets
Revises: 0007_neutral_outbox
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008_opcua_counter_resets'
down_revision = '0007_neutral_outbox'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('opcua_counter_resets',
    sa.Column('source', sa.String(length=128), nullable=False),
    sa.Column('inspection_id', sa.BigInteger(), nullable=False),
    sa.Column('seq', sa.BigInteger(), nullable=False),
    sa.Column('reset_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('source', name=op.f('pk_opcua_counter_resets'))
    )


def downgrade() -> None:
    op.drop_table('opcua_counter_resets')
