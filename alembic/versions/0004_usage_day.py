"""usage_day: per (tenant, kind, UTC day) sums over the usage_interval edges (derived, rebuildable);
an index on usage_interval.start_s for the starts inside a partial day

Revision ID: 0004_usage_day
Revises: 0003_billing_indexes
Create Date: 2026-11-30 12:00:00.000000
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel

from alembic import op

revision: str = '0004_usage_day'
down_revision: str | None = '0003_billing_indexes'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SUMS = ('starts', 'start_bytes', 'start_off_hi', 'start_off_lo', 'stops', 'stop_bytes', 'stop_off_hi', 'stop_off_lo')


def upgrade() -> None:
    op.create_table('usage_day',
    sa.Column('tenant_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('day', sa.BigInteger(), autoincrement=False, nullable=False),
    *[sa.Column(name, sa.BigInteger(), nullable=False) for name in SUMS],
    sa.PrimaryKeyConstraint('tenant_id', 'kind', 'day')
    )
    with op.batch_alter_table('usage_interval', schema=None) as batch_op:
        batch_op.create_index('ix_usage_interval_start_cover', ['start_s', 'tenant_id', 'kind', 'size_bytes'], unique=False)

    # data step: the edge sums of the existing intervals (a pure function of usage_interval)
    from weightstore.intervals import rebuild_days

    rebuild_days(op.get_bind())


def downgrade() -> None:
    with op.batch_alter_table('usage_interval', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_interval_start_cover')

    op.drop_table('usage_day')
