"""Initial schema: inspections, labels, model_versions, training_runs, outbox, rejected_frames.

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('inspections',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('uuid', sa.String(length=36), nullable=False),
    sa.Column('frame_id', sa.String(length=255), nullable=False),
    sa.Column('source', sa.String(length=128), nullable=False),
    sa.Column('line', sa.String(length=128), nullable=False),
    sa.Column('frame_name', sa.Text(), nullable=True),
    sa.Column('captured_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('processed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('model_version', sa.String(length=255), nullable=False),
    sa.Column('score', sa.Float(), nullable=True),
    sa.Column('threshold', sa.Float(), nullable=False),
    sa.Column('is_anomalous', sa.Boolean(), nullable=False),
    sa.Column('regions', sa.JSON(), nullable=False),
    sa.Column('mask_path', sa.Text(), nullable=True),
    sa.Column('heatmap_path', sa.Text(), nullable=True),
    sa.Column('frame_path', sa.Text(), nullable=True),
    sa.Column('width', sa.Integer(), nullable=True),
    sa.Column('height', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('meta', sa.JSON(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_inspections')),
    sa.UniqueConstraint('frame_id', name=op.f('uq_inspections_frame_id')),
    sa.UniqueConstraint('uuid', name=op.f('uq_inspections_uuid'))
    )
    with op.batch_alter_table('inspections', schema=None) as batch_op:
        batch_op.create_index('ix_inspections_captured_at', ['captured_at'], unique=False)
        batch_op.create_index('ix_inspections_is_anomalous_captured_at', ['is_anomalous', 'captured_at'], unique=False)
        batch_op.create_index('ix_inspections_line_captured_at', ['line', 'captured_at'], unique=False)
        batch_op.create_index('ix_inspections_score', ['score'], unique=False)
        batch_op.create_index('ix_inspections_source_captured_at', ['source', 'captured_at'], unique=False)

    op.create_table('model_versions',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('version', sa.String(length=255), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('prompts_path', sa.Text(), nullable=True),
    sa.Column('metrics', sa.JSON(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('activated_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('notes', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_versions')),
    sa.UniqueConstraint('version', name=op.f('uq_model_versions_version'))
    )
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_model_versions_status'), ['status'], unique=False)

    op.create_table('rejected_frames',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('source', sa.String(length=128), nullable=False),
    sa.Column('frame_id', sa.String(length=255), nullable=True),
    sa.Column('name', sa.Text(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rejected_frames'))
    )
    with op.batch_alter_table('rejected_frames', schema=None) as batch_op:
        batch_op.create_index('ix_rejected_frames_source_created_at', ['source', 'created_at'], unique=False)
        batch_op.create_index('ix_rejected_frames_frame_id', ['frame_id'], unique=False)

    op.create_table('training_runs',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('params', sa.JSON(), nullable=True),
    sa.Column('metrics', sa.JSON(), nullable=True),
    sa.Column('candidate_version', sa.String(length=255), nullable=True),
    sa.Column('promoted', sa.Boolean(), nullable=False),
    sa.Column('log', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_training_runs'))
    )
    op.create_table('labels',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('inspection_id', sa.Integer(), nullable=False),
    sa.Column('label', sa.String(length=16), nullable=False),
    sa.Column('mask_path', sa.Text(), nullable=True),
    sa.Column('author', sa.String(length=128), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['inspection_id'], ['inspections.id'], name=op.f('fk_labels_inspection_id_inspections'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_labels'))
    )
    with op.batch_alter_table('labels', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_labels_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_labels_inspection_id'), ['inspection_id'], unique=False)

    op.create_table('outbox',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('topic', sa.Text(), nullable=False),
    sa.Column('payload', sa.Text(), nullable=False),
    sa.Column('qos', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('inspection_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['inspection_id'], ['inspections.id'], name=op.f('fk_outbox_inspection_id_inspections'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outbox'))
    )
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.create_index('ix_outbox_sent_at_created_at', ['sent_at', 'created_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_sent_at_created_at')

    op.drop_table('outbox')
    with op.batch_alter_table('labels', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_labels_inspection_id'))
        batch_op.drop_index(batch_op.f('ix_labels_created_at'))

    op.drop_table('labels')
    op.drop_table('training_runs')
    with op.batch_alter_table('rejected_frames', schema=None) as batch_op:
        batch_op.drop_index('ix_rejected_frames_frame_id')
        batch_op.drop_index('ix_rejected_frames_source_created_at')

    op.drop_table('rejected_frames')
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_model_versions_status'))

    op.drop_table('model_versions')
    with op.batch_alter_table('inspections', schema=None) as batch_op:
        batch_op.drop_index('ix_inspections_source_captured_at')
        batch_op.drop_index('ix_inspections_score')
        batch_op.drop_index('ix_inspections_line_captured_at')
        batch_op.drop_index('ix_inspections_is_anomalous_captured_at')
        batch_op.drop_index('ix_inspections_captured_at')

    op.drop_table('inspections')
