"""usage_interval: derived per-checkpoint billing intervals (rebuilt from the ledger)

Revision ID: 0002_usage_interval
Revises: 0001_initial
Create Date: 2026-11-29 12:00:00.000000

Frozen: the table and the data step's SQL are written out here, never imported from ``weightstore``,
so a later change to the models or to the billing code can not change what this migration does. The
data step is the interval rule as of this revision (the one ``weightstore.billing.intervals`` kept).
"""
from typing import Sequence, Union

import sqlalchemy as sa

from alembic import op

revision: str = '0002_usage_interval'
down_revision: Union[str, None] = '0001_initial'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

OPEN_END_S = 4611686018427387904  # 2**62: stop_s of an interval with neither an end nor an expiry

# whole epoch seconds (floored) of a timestamp, per dialect
EPOCH_SQL = {
    'sqlite': "CAST(strftime('%s', {}) AS INTEGER)",
    'postgresql': 'CAST(floor(extract(epoch FROM {})) AS BIGINT)',
}

# one interval per checkpoint: start = first commit; stop = min(first end after the last restore,
# expires_at of the latest ledger row), clamped to >= start; OPEN_END_S while neither exists
DERIVE_SQL = """
INSERT INTO usage_interval (checkpoint_id, tenant_id, run_id, kind, size_bytes, start_s, end_s, expires_s, stop_s)
SELECT checkpoint_id, tenant_id, run_id, kind, size_bytes, start_s, end_s, expires_s,
  CASE WHEN stop_s < start_s THEN start_s ELSE stop_s END
FROM (
  SELECT checkpoint_id, tenant_id, run_id, kind, size_bytes, start_s, end_s, expires_s,
    CASE WHEN end_s IS NULL AND expires_s IS NULL THEN {open_end}
         WHEN end_s IS NULL THEN expires_s
         WHEN expires_s IS NULL OR end_s < expires_s THEN end_s
         ELSE expires_s END AS stop_s
  FROM (
    SELECT e.checkpoint_id, MIN(e.tenant_id) AS tenant_id, MIN(e.run_id) AS run_id, MIN(e.kind) AS kind,
      MAX(CASE WHEN e.event = 'commit' THEN e.size_bytes END) AS size_bytes,
      {start_s} AS start_s,
      {end_s} AS end_s,
      {expires_s} AS expires_s
    FROM usage_event e JOIN (
      SELECT checkpoint_id, MAX(id) AS m, COALESCE(MAX(CASE WHEN event = 'restore' THEN id END), 0) AS r
      FROM usage_event GROUP BY checkpoint_id) h ON h.checkpoint_id = e.checkpoint_id
    GROUP BY e.checkpoint_id) agg
  WHERE start_s IS NOT NULL) iv
"""


def upgrade() -> None:
    op.create_table('usage_interval',
    sa.Column('checkpoint_id', sa.String(length=64), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('run_id', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
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
    bind = op.get_bind()
    epoch = EPOCH_SQL[bind.dialect.name].format
    bind.execute(sa.text(DERIVE_SQL.format(
        open_end=OPEN_END_S,
        start_s=epoch("MIN(CASE WHEN e.event = 'commit' THEN e.at END)"),
        end_s=epoch("MIN(CASE WHEN e.event = 'end' AND e.id > h.r THEN e.at END)"),
        expires_s=epoch('MAX(CASE WHEN e.id = h.m THEN e.expires_at END)'),
    )))


def downgrade() -> None:
    with op.batch_alter_table('usage_interval', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_interval_tenant_stop')
        batch_op.drop_index('ix_usage_interval_cover')

    op.drop_table('usage_interval')
