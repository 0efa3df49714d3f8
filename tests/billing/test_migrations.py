"""The billing migrations carry frozen copies of the derivation SQL (they import no ``weightstore`` code):
on an existing ledger their data steps must produce exactly what the live code derives today."""

from __future__ import annotations

import ast
import re
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa

from alembic import command
from tests.billing.ledger_builder import T0, h
from tests.billing.test_metering import _interval_rows, _recompute_from_ledger
from weightstore import db
from weightstore.billing.intervals import rebuild_intervals
from weightstore.db import session_scope
from weightstore.models import UsageEvent, UsageEventKind

ALEMBIC = Path(__file__).resolve().parents[2] / "alembic"


def _template_as_python(text: str) -> str:
    """The migration template made valid Python: every ``${...}`` placeholder becomes ``None``."""
    return re.sub(r"\$\{[^}]*\}", "None", text)


def test_migrations_and_their_template_import_no_live_code():
    """Every migration (and the template new ones start from) imports only alembic and SQLAlchemy: a
    later change to the models or the billing code must never change what an old migration does."""
    for path in [*sorted((ALEMBIC / "versions").glob("*.py")), ALEMBIC / "script.py.mako"]:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".mako":
            text = _template_as_python(text)
        imported = set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert imported <= {"alembic", "sqlalchemy", "collections", "typing", "__future__"}, (path.name, imported)


def test_migration_0002_derives_the_intervals_the_live_code_derives(db_url):
    """Down to 0001 (no usage_interval), a ledger with every event kind (an end cancelled by a restore,
    TTL changes, an expiry before the commit, an open-ended checkpoint), up again: the migration's
    rows equal a rebuild by ``weightstore.billing.intervals`` and the plain-Python interval rule."""
    cfg = db.alembic_config(db_url)
    command.downgrade(cfg, "0001_initial")
    eng = db.make_engine(db_url, pool_size=2)
    try:
        with session_scope(eng) as s:
            assert not sa.inspect(s.connection()).has_table("usage_interval")
            history = {
                "open": [(UsageEventKind.commit, 0, None)],
                "ended": [(UsageEventKind.commit, 1, None), (UsageEventKind.end, 30.5, None)],
                "restored": [
                    (UsageEventKind.commit, 2, T0 + h(10)),
                    (UsageEventKind.end, 10, T0 + h(10)),
                    (UsageEventKind.restore, 12, None),
                ],
                "ttl": [(UsageEventKind.commit, 3, T0 + h(5)), (UsageEventKind.ttl, 4, T0 + h(50))],
                "expired-early": [(UsageEventKind.commit, 6, None), (UsageEventKind.ttl, 7, T0 - timedelta(days=1))],
            }
            for i, (ckpt, events) in enumerate(history.items()):
                for event, at_h, expires_at in events:
                    s.add(
                        UsageEvent(
                            tenant_id=("acme", "globex")[i % 2],
                            run_id=f"r{i}",
                            checkpoint_id=ckpt,
                            kind="training",
                            event=event,
                            at=T0 + h(at_h),
                            size_bytes=10**15 + i,
                            expires_at=expires_at,
                            recorded_at=T0 + h(at_h),
                        )
                    )
                    s.flush()  # ids in the order written: a restore cancels only the ends before it
        db.upgrade(db_url)
        command.check(cfg)
        migrated = _interval_rows(eng)
        assert migrated == _recompute_from_ledger(eng)
        assert len(migrated) == len(history)
        with session_scope(eng) as s:
            rebuild_intervals(s)
        assert _interval_rows(eng) == migrated
    finally:
        eng.dispose()
