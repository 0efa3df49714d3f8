"""usage_day: per (tenant, kind, UTC day) sums over the usage_interval edges (derived, rebuildable);
an index on usage_interval.start_s for the starts inside a partial day

Revision ID: 0004_usage_day
Revises: 0003_billing_indexes
Create Date: 2026-11-30 12:00:00.000000

Frozen: the table and the data step's SQL are written out here, never imported from ``weightstore``,
so a later change to the models or to the billing code can not change what this migration does.
"""
from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = '0004_usage_day'
down_revision: str | None = '0003_billing_indexes'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SUMS = ('starts', 'start_bytes', 'start_off_hi', 'start_off_lo', 'stops', 'stop_bytes', 'stop_off_hi', 'stop_off_lo')

# the edges of every interval (starts; stops unless open-ended, stop_s = 2**62), summed per (tenant,
# kind, UTC day); size x offset-in-day split at 10**6 bytes (*_off_hi, *_off_lo) to stay inside 64 bits
REBUILD_DAYS_SQL = """
INSERT INTO usage_day (tenant_id, kind, day, starts, start_bytes, start_off_hi, start_off_lo, stops, stop_bytes, stop_off_hi, stop_off_lo)
SELECT tenant_id, kind, day, SUM(starts), SUM(start_bytes), SUM(start_off_hi), SUM(start_off_lo), SUM(stops), SUM(stop_bytes), SUM(stop_off_hi), SUM(stop_off_lo) FROM (
  SELECT tenant_id, kind, start_s / 86400 AS day, 1 AS starts, size_bytes AS start_bytes, size_bytes / 1000000 * (start_s % 86400) AS start_off_hi, size_bytes % 1000000 * (start_s % 86400) AS start_off_lo, 0 AS stops, 0 AS stop_bytes, 0 AS stop_off_hi, 0 AS stop_off_lo FROM usage_interval
  UNION ALL
  SELECT tenant_id, kind, stop_s / 86400, 0, 0, 0, 0, 1, size_bytes, size_bytes / 1000000 * (stop_s % 86400), size_bytes % 1000000 * (stop_s % 86400) FROM usage_interval WHERE stop_s < 4611686018427387904
) e
GROUP BY tenant_id, kind, day"""


def upgrade() -> None:
    op.create_table('usage_day',
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('day', sa.BigInteger(), autoincrement=False, nullable=False),
    *[sa.Column(name, sa.BigInteger(), nullable=False) for name in SUMS],
    sa.PrimaryKeyConstraint('tenant_id', 'kind', 'day')
    )
    with op.batch_alter_table('usage_interval', schema=None) as batch_op:
        batch_op.create_index('ix_usage_interval_start_cover', ['start_s', 'tenant_id', 'kind', 'size_bytes'], unique=False)

    # data step: the edge sums of the existing intervals (a pure function of usage_interval)
    op.get_bind().execute(sa.text(REBUILD_DAYS_SQL))


def downgrade() -> None:
    with op.batch_alter_table('usage_interval', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_interval_start_cover')

    op.drop_table('usage_day')
