"""Conflicts between concurrent transactions are transient, never a 500 (issue 11's reliability harness
found a deadlock between two upload declares answering HTTP 500 on PostgreSQL).

The class: whenever the database aborts one of two conflicting transactions (deadlock, serialization
failure, lock timeout, SQLite busy), ``session_scope`` turns it into the retryable ``CatalogBusy``
(503 + Retry-After in the error table), and everything else passes through untouched."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from weightstore.db import is_transient_conflict, make_engine, session_scope
from weightstore.errors import CatalogBusy


def test_a_real_deadlock_leaves_as_catalog_busy(db_url: str) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite serialises writers (BEGIN IMMEDIATE): no deadlock to provoke")
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE deadlock_probe (id int primary key, v int)"))
        conn.execute(sa.text("INSERT INTO deadlock_probe VALUES (1, 0), (2, 0)"))
    barrier = threading.Barrier(2)
    outcomes: list[BaseException | None] = [None, None]

    def worker(i: int, first: int, second: int) -> None:
        try:
            with session_scope(engine) as s:
                s.execute(sa.text("UPDATE deadlock_probe SET v = v + 1 WHERE id = :i"), {"i": first})
                barrier.wait(timeout=10)
                s.execute(sa.text("UPDATE deadlock_probe SET v = v + 1 WHERE id = :i"), {"i": second})
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            outcomes[i] = exc

    threads = [threading.Thread(target=worker, args=(0, 1, 2)), threading.Thread(target=worker, args=(1, 2, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    failed = [o for o in outcomes if o is not None]
    assert len(failed) == 1, outcomes  # PostgreSQL aborts exactly one of the two
    assert isinstance(failed[0], CatalogBusy), repr(failed[0])
    assert "deadlock" in str(failed[0])
    with engine.begin() as conn:
        assert conn.execute(sa.text("SELECT sum(v) FROM deadlock_probe")).scalar() == 2  # the survivor committed
    engine.dispose()


class _Orig(Exception):
    def __init__(self, sqlstate: str | None, text: str = "") -> None:
        super().__init__(text)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("sqlstate", "text", "transient"),
    [
        ("40P01", "deadlock detected", True),
        ("40001", "could not serialize access", True),
        ("55P03", "canceling statement due to lock timeout", True),
        (None, "database is locked", True),
        ("23505", "duplicate key value", False),  # a real conflict the code decides on (S5), not a retry
        ("42P01", "relation does not exist", False),
    ],
)
def test_which_database_errors_are_transient(sqlstate: str | None, text: str, transient: bool) -> None:
    cls = sa_exc.IntegrityError if sqlstate == "23505" else sa_exc.OperationalError
    exc = cls("stmt", {}, _Orig(sqlstate, text))
    assert is_transient_conflict(exc) is transient
