"""Alembic environment: URL from the config (set by weightstore.db.upgrade) or the settings.

The migrations themselves never import ``weightstore`` (see script.py.mako); this file does, and must:
``target_metadata`` is the live models' schema, which ``alembic revision --autogenerate`` diffs against
the database to write a new migration and ``alembic check`` (tests/core/test_migrations.py) diffs to
prove the migrations build exactly the models. ``render_item`` writes the models' custom column types
into new migrations as the plain SQLAlchemy types they are in the database, so a generated migration
stays frozen when the models change later.
"""

from typing import Any, Literal

from alembic.autogenerate.api import AutogenContext
from sqlmodel import SQLModel
from sqlmodel.sql.sqltypes import AutoString

from alembic import context
from weightstore.db import make_engine
from weightstore.models import UTCDateTime  # importing the models registers the tables on SQLModel.metadata
from weightstore.settings import Settings

config = context.config
target_metadata = SQLModel.metadata


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Render custom column types as their database type: ``UTCDateTime`` is ``DateTime(timezone=True)``
    (the offset is put back in Python, not stored), sqlmodel's ``AutoString`` is ``String``."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    if type_ == "type" and isinstance(obj, AutoString):
        return f"sa.String(length={obj.length!r})" if obj.length is not None else "sa.String()"
    return False  # the default rendering (plain sa.* types)


def _url() -> str:
    return config.get_main_option("sqlalchemy.url") or Settings().resolved_database_url


def _configure(**kwargs: Any) -> None:
    context.configure(target_metadata=target_metadata, render_as_batch=True, render_item=render_item, **kwargs)


def run_migrations_offline() -> None:
    _configure(url=_url(), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(_url())
    with engine.connect() as connection:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
