"""usage_interval: derived per-checkpoint billing intervals (rebuilt from the ledger)

Revision ID: 0002_usage_interval
Revises: 0001_initial
Create Date: 2026-11-29 12:00:00.000000
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel
import weightstore.models


revision: str = '0002_usage_interval'
down_revision: Union[str, None] = '0001_initial'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('usage_interval',
    sa.Column('checkpoint_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('tenant_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('run_id', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('start_s', sa.BigInteger(), nullable=False),
    sa.Column('end_s', sa.BigInteger(), nullable=True),
    sa.Column('expires_s', sa.BigInteger(), nullable=True),
    sa.Column('stop_s', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('checkpoint_id')
    )
    with op.batch_alter_table('usage_interval', schema=None) as batch_op:
        batch_op.create_index('ix_usage_interval_cover', ['tenant_id', 'kind', 'run_id', 'stop_s', 'start_s', 'size_bytes'], unique=False)
        batch_op.create_index('ix_usage_interval_tenant_stop', ['tenant_id', 'stop_s'], unique=False)

    # data step: derive the rows of an existing ledger (a pure function of usage_event)
    from weightstore.intervals import derive_intervals

    derive_intervals(op.get_bind())


def downgrade() -> None:
    with op.batch_alter_table('usage_interval', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_interval_tenant_stop')
        batch_op.drop_index('ix_usage_interval_cover')

    op.drop_table('usage_interval')
