"""retention_policies: per-run / per-tenant retention policies and a pinned flag on checkpoints

Revision ID: 0009_retention_policies
Revises: 0008_tenant_admin
Create Date: 2026-12-02 03:00:00.000000
"""
from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = '0009_retention_policies'
down_revision: str | None = '0008_tenant_admin'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('retention_policy',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('run_id', sa.String(length=200), nullable=True),
    sa.Column('keep_last', sa.Integer(), nullable=True),
    sa.Column('keep_every', sa.Integer(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['training_run.id'], ),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenant.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('retention_policy', schema=None) as batch_op:
        batch_op.create_index('uq_retention_policy_run', ['run_id'], unique=True)
        batch_op.create_index('uq_retention_policy_tenant_default', ['tenant_id'], unique=True,
                              sqlite_where=sa.text('run_id IS NULL'), postgresql_where=sa.text('run_id IS NULL'))
    # Plain ADD/DROP COLUMN: a batch "recreate" of `checkpoint` fails on SQLite once manifests point at it.
    op.add_column('checkpoint', sa.Column('pinned', sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    op.execute(sa.text('ALTER TABLE checkpoint DROP COLUMN pinned'))
    with op.batch_alter_table('retention_policy', schema=None) as batch_op:
        batch_op.drop_index('uq_retention_policy_tenant_default', sqlite_where=sa.text('run_id IS NULL'),
                            postgresql_where=sa.text('run_id IS NULL'))
        batch_op.drop_index('uq_retention_policy_run')
    op.drop_table('retention_policy')
