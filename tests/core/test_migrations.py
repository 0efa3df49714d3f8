"""Migrations are the only way the schema is made: they must match the models exactly."""

from __future__ import annotations

from alembic import command
from weightstore import db


def test_models_and_migrations_agree(db_url):
    # `alembic check` autogenerates against the migrated database and fails on any drift.
    command.check(db.alembic_config(db_url))


def test_downgrade_and_upgrade_again(tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    db.upgrade(url)
    command.downgrade(db.alembic_config(url), "base")
    db.upgrade(url)
    command.check(db.alembic_config(url))
