"""tenant administration: operator flag, state (active/disabled/deleted), hard and soft quotas

The bootstrap tenant (the one holding the admin key named ``bootstrap``) becomes the operator tenant.

Revision ID: 0008_tenant_admin
Revises: 0007_archive_cache
Create Date: 2026-12-10 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = '0008_tenant_admin'
down_revision: str | None = '0007_archive_cache'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN: a batch "recreate" would rebuild `tenant`, which SQLite refuses once rows of
    # other tables point at it.
    op.add_column("tenant", sa.Column("operator", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("tenant", sa.Column("state", sa.String(length=16), nullable=False, server_default="active"))
    op.add_column("tenant", sa.Column("quota_bytes", sa.BigInteger(), nullable=True))
    op.add_column("tenant", sa.Column("soft_quota_bytes", sa.BigInteger(), nullable=True))
    # frozen data step: the tenant of the bootstrap admin key is the operator's own tenant
    op.execute(
        sa.text(
            "UPDATE tenant SET operator = :yes WHERE id IN "
            "(SELECT tenant_id FROM api_key WHERE name = 'bootstrap' AND role = 'admin')"
        ).bindparams(yes=True)
    )


def downgrade() -> None:
    # Plain ALTER TABLE ... DROP COLUMN (SQLite >= 3.35 and PostgreSQL): a batch "recreate" would drop
    # and rebuild `tenant`, which SQLite refuses while other tables' foreign keys point at it.
    for column in ("soft_quota_bytes", "quota_bytes", "state", "operator"):
        op.execute(sa.text(f"ALTER TABLE tenant DROP COLUMN {column}"))
