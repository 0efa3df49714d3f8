"""archive_cache: the legacy Tinker archive built for a checkpoint, so it is built (read and hashed) once

Revision ID: 0007_archive_cache
Revises: 0006_admin_ui_session
Create Date: 2026-12-02 02:40:00.000000
"""
from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = '0007_archive_cache'
down_revision: str | None = '0006_admin_ui_session'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('archive_cache',
    sa.Column('checkpoint_id', sa.String(length=64), nullable=False),
    sa.Column('manifest_digest', sa.String(length=64), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('checkpoint_id')
    )


def downgrade() -> None:
    op.drop_table('archive_cache')
