"""blob_chunks: per-chunk sha256s of each blob, for verified parallel loads (issue 14, part 1)

Revision ID: 0012_chunk_digests
Revises: 0011_invoice_snapshots
Create Date: 2026-12-02 05:20:00.000000
"""
from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = '0012_chunk_digests'
down_revision: str | None = '0011_invoice_snapshots'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('blob_chunks',
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('chunk_size', sa.Integer(), nullable=False),
    sa.Column('digests', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('sha256')
    )


def downgrade() -> None:
    op.drop_table('blob_chunks')
