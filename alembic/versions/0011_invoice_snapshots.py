"""invoice_snapshot: closed months' invoices, frozen the first time they are read or closed

Revision ID: 0011_invoice_snapshots
Revises: 0010_run_deleted
Create Date: 2026-12-02 03:00:00.000000
"""
from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = '0011_invoice_snapshots'
down_revision: str | None = '0010_run_deleted'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('invoice_snapshot',
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('month', sa.String(length=7), nullable=False),
    sa.Column('number', sa.String(length=100), nullable=False),
    sa.Column('closed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('total_usd', sa.String(length=32), nullable=False),
    sa.Column('document', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('tenant_id', 'month'),
    sa.UniqueConstraint('number')
    )


def downgrade() -> None:
    op.drop_table('invoice_snapshot')
