"""Fixtures shared by the billing tests: a migrated engine (SQLite and PostgreSQL via ``db_url``)
and a ledger builder writing through the service's own ledger path."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.billing.ledger_builder import LedgerBuilder
from weightstore import db


@pytest.fixture
def engine(db_url: str) -> Iterator[object]:
    eng = db.make_engine(db_url, pool_size=2)
    yield eng
    eng.dispose()


@pytest.fixture
def ledger(engine) -> LedgerBuilder:  # type: ignore[no-untyped-def]
    return LedgerBuilder(engine)
