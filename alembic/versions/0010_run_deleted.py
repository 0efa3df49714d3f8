"""run_deleted: training_run.deleted_at, so `runs rm` hides a run while its history (ledger, invoices) keeps it

Revision ID: 0010_run_deleted
Revises: 0009_retention_policies
Create Date: 2026-12-10 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = '0010_run_deleted'
down_revision: str | None = '0009_retention_policies'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD/DROP COLUMN: a batch "recreate" of `training_run` fails on SQLite once checkpoints point at it.
    op.add_column("training_run", sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.execute(sa.text("ALTER TABLE training_run DROP COLUMN deleted_at"))
