"""billing indexes: all-tenant windows read a range of usage_interval.stop_s; physical bytes read
the live checkpoints' manifests index-only

Revision ID: 0003_billing_indexes
Revises: 0002_usage_interval
Create Date: 2026-11-29 13:00:00.000000
"""
from collections.abc import Sequence

from alembic import op

revision: str = '0003_billing_indexes'
down_revision: str | None = '0002_usage_interval'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = {
    'usage_interval': ('ix_usage_interval_stop_cover', ['stop_s', 'start_s', 'tenant_id', 'kind', 'size_bytes']),
    'checkpoint': ('ix_checkpoint_billing_live', ['state', 'tenant_id', 'expires_at', 'id']),
    'checkpoint_file': ('ix_checkpoint_file_blob', ['checkpoint_id', 'sha256', 'size_bytes']),
}


def upgrade() -> None:
    for table, (name, columns) in INDEXES.items():
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.create_index(name, columns, unique=False)


def downgrade() -> None:
    for table, (name, _columns) in reversed(INDEXES.items()):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(name)
