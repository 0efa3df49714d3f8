"""Write arbitrary usage-ledger rows (what uploads/checkpoints/collector would write), for exact tests.

Rows go through ``ledger.record``, the writers' own path, so the derived ``usage_interval`` table is
maintained exactly as in the service."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from weightstore import ledger
from weightstore.db import session_scope
from weightstore.models import UsageEvent, UsageInterval

T0 = datetime(2026, 1, 10, tzinfo=UTC)  # an hour-aligned instant inside a month


def h(hours: float) -> timedelta:
    return timedelta(hours=hours)


class LedgerBuilder:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.pending: list[dict[str, object]] | None = None

    def batch_begin(self) -> None:
        self.pending = []

    def batch_flush(self) -> None:
        rows, self.pending = self.pending or [], None
        with session_scope(self.engine) as s:
            for row in rows:
                ledger.record(s, **row)  # type: ignore[arg-type]

    def _add(self, ckpt: str, event: str, at: datetime, *, tenant: str, run: str, kind: str, size: int,
             expires_at: datetime | None) -> None:
        row: dict[str, object] = dict(tenant_id=tenant, run_id=run, checkpoint_id=ckpt, kind=kind, event=event, at=at,
                                      size_bytes=size, expires_at=expires_at, recorded_at=at)
        if self.pending is not None:
            self.pending.append(row)
            return
        with session_scope(self.engine) as s:
            ledger.record(s, **row)  # type: ignore[arg-type]

    def commit(self, ckpt: str, at: datetime, size: int, *, tenant: str = "acme", run: str = "run-1",
               kind: str = "training", expires_at: datetime | None = None) -> None:
        self._add(ckpt, "commit", at, tenant=tenant, run=run, kind=kind, size=size, expires_at=expires_at)

    def end(self, ckpt: str, at: datetime, size: int, *, tenant: str = "acme", run: str = "run-1",
            kind: str = "training", expires_at: datetime | None = None) -> None:
        self._add(ckpt, "end", at, tenant=tenant, run=run, kind=kind, size=size, expires_at=expires_at)

    def ttl(self, ckpt: str, at: datetime, size: int, expires_at: datetime | None, *, tenant: str = "acme",
            run: str = "run-1", kind: str = "training") -> None:
        self._add(ckpt, "ttl", at, tenant=tenant, run=run, kind=kind, size=size, expires_at=expires_at)

    def restore(self, ckpt: str, at: datetime, size: int, expires_at: datetime | None, *, tenant: str = "acme",
                run: str = "run-1", kind: str = "training") -> None:
        self._add(ckpt, "restore", at, tenant=tenant, run=run, kind=kind, size=size, expires_at=expires_at)

    def reset(self) -> None:
        """Tests only: the ledger is append-only in the service."""
        with session_scope(self.engine) as s:
            s.execute(sa.delete(UsageEvent))
            s.execute(sa.delete(UsageInterval))
