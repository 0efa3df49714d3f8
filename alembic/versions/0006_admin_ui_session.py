"""admin_ui_session: server-side admin UI sessions, so sign-out and key revocation end them at once

Revision ID: 0006_admin_ui_session
Revises: 0005_tinker_sessions
Create Date: 2026-12-03 12:00:00.000000

Frozen: plain SQLAlchemy types and SQL only, never ``weightstore`` code (alembic/env.py renders the
models' custom types as what they are in the database), so a later change to the models or the
service can not change what this migration does. Data steps are written out as SQL here.
"""
from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = '0006_admin_ui_session'
down_revision: str | None = '0005_tinker_sessions'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('admin_ui_session',
    sa.Column('id_hash', sa.String(length=64), nullable=False),
    sa.Column('key_id', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['key_id'], ['api_key.id'], ),
    sa.PrimaryKeyConstraint('id_hash')
    )
    op.create_index(op.f('ix_admin_ui_session_expires_at'), 'admin_ui_session', ['expires_at'], unique=False)
    op.create_index(op.f('ix_admin_ui_session_key_id'), 'admin_ui_session', ['key_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_admin_ui_session_key_id'), table_name='admin_ui_session')
    op.drop_index(op.f('ix_admin_ui_session_expires_at'), table_name='admin_ui_session')
    op.drop_table('admin_ui_session')
