"""Write arbitrary usage-ledger rows (what uploads/checkpoints/collector would write), for exact tests.

Rows go through ``ledger.record``, the writers' own path, so the derived ``usage_interval`` table is
maintained exactly as in the service."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from weightstore.billing import ledger
from weightstore.db import session_scope
from weightstore.models import UsageDay, UsageEvent, UsageEventKind, UsageInterval

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

    def _add(
        self,
        ckpt: str,
        event: UsageEventKind,
        at: datetime,
        *,
        tenant: str,
        run: str,
        kind: str,
        size: int,
        expires_at: datetime | None,
    ) -> None:
        row: dict[str, object] = dict(
            tenant_id=tenant,
            run_id=run,
            checkpoint_id=ckpt,
            kind=kind,
            event=event,
            at=at,
            size_bytes=size,
            expires_at=expires_at,
            recorded_at=at,
        )
        if self.pending is not None:
            self.pending.append(row)
            return
        with session_scope(self.engine) as s:
            ledger.record(s, **row)  # type: ignore[arg-type]

    def commit(
        self,
        ckpt: str,
        at: datetime,
        size: int,
        *,
        tenant: str = "acme",
        run: str = "run-1",
        kind: str = "training",
        expires_at: datetime | None = None,
    ) -> None:
        self._add(ckpt, UsageEventKind.commit, at, tenant=tenant, run=run, kind=kind, size=size, expires_at=expires_at)

    def end(
        self,
        ckpt: str,
        at: datetime,
        size: int,
        *,
        tenant: str = "acme",
        run: str = "run-1",
        kind: str = "training",
        expires_at: datetime | None = None,
    ) -> None:
        self._add(ckpt, UsageEventKind.end, at, tenant=tenant, run=run, kind=kind, size=size, expires_at=expires_at)

    def ttl(
        self,
        ckpt: str,
        at: datetime,
        size: int,
        expires_at: datetime | None,
        *,
        tenant: str = "acme",
        run: str = "run-1",
        kind: str = "training",
    ) -> None:
        self._add(ckpt, UsageEventKind.ttl, at, tenant=tenant, run=run, kind=kind, size=size, expires_at=expires_at)

    def restore(
        self,
        ckpt: str,
        at: datetime,
        size: int,
        expires_at: datetime | None,
        *,
        tenant: str = "acme",
        run: str = "run-1",
        kind: str = "training",
    ) -> None:
        self._add(ckpt, UsageEventKind.restore, at, tenant=tenant, run=run, kind=kind, size=size, expires_at=expires_at)

    def replay(self, events: list[tuple], ops: list[tuple], *, ops_one_transaction_each: bool) -> list[tuple]:
        """Random-history helper for property tests: ``events`` = (tenant, kind, start offset, life or
        None, ttl or None, size) commits (and ends), then ``ops`` = (index, end|ttl|ttl-none|restore,
        offset) on them. Commits go in one transaction; ops too, or one each. Returns the commits as
        (checkpoint, tenant, kind, at, size)."""
        self.batch_begin()
        made = []
        for i, (tenant, kind, start, life, ttl, size) in enumerate(events):
            at = T0 + timedelta(seconds=start)
            exp = None if ttl is None else at + timedelta(seconds=ttl)
            self.commit(f"c{i}", at, size, tenant=tenant, kind=kind, expires_at=exp)
            made.append((f"c{i}", tenant, kind, at, size))
            if life is not None:
                self.end(f"c{i}", at + timedelta(seconds=life), size, tenant=tenant, kind=kind, expires_at=exp)
        if ops_one_transaction_each:
            self.batch_flush()
        for idx, op, offset in ops:
            if idx >= len(made):
                continue
            ck, tenant, kind, at, size = made[idx]
            when = at + timedelta(seconds=offset)
            if op == "end":
                self.end(ck, when, size, tenant=tenant, kind=kind, expires_at=None)
            elif op == "ttl":
                self.ttl(ck, when, size, when + timedelta(hours=5), tenant=tenant, kind=kind)
            elif op == "ttl-none":
                self.ttl(ck, when, size, None, tenant=tenant, kind=kind)
            else:
                self.restore(ck, when, size, None, tenant=tenant, kind=kind)
        if not ops_one_transaction_each:
            self.batch_flush()
        return made

    def reset(self) -> None:
        """Tests only: the ledger is append-only in the service."""
        with session_scope(self.engine) as s:
            s.execute(sa.delete(UsageEvent))
            s.execute(sa.delete(UsageInterval))
            s.execute(sa.delete(UsageDay))
