"""outbox.seq: the order every sink delivers in (a monotonic number; created_at ties within a transaction).

Existing rows are numbered in their old order (created_at, id); PostgreSQL gets the `outbox_seq` sequence,
started after them.

Revision ID: 0004_outbox_seq
Revises: 0003_webhooks
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004_outbox_seq'
down_revision = '0003_webhooks'
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.add_column(sa.Column('seq', sa.BigInteger(), nullable=True))
    outbox = sa.table('outbox', sa.column('id', sa.String), sa.column('seq', sa.BigInteger),
                      sa.column('created_at', sa.DateTime))
    ids = bind.execute(sa.select(outbox.c.id).order_by(outbox.c.created_at, outbox.c.id)).scalars().all()
    if ids:
        bind.execute(outbox.update().where(outbox.c.id == sa.bindparam('row_id')).values(seq=sa.bindparam('number')),
                     [{'row_id': row_id, 'number': number} for number, row_id in enumerate(ids, start=1)])
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.alter_column('seq', existing_type=sa.BigInteger(), nullable=False)
        batch_op.create_index('ix_outbox_seq', ['seq'], unique=True)
    if bind.dialect.name == 'postgresql':
        op.execute(sa.schema.CreateSequence(sa.Sequence('outbox_seq', start=len(ids) + 1)))


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(sa.schema.DropSequence(sa.Sequence('outbox_seq')))
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_seq')
        batch_op.drop_column('seq')
