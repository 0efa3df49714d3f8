"""A named leader lease in the catalog: one collector at a time across processes and machines.

The row ``lease(name='gc')`` holds the owner, a fencing ``token`` (incremented on every
acquisition), the last heartbeat and the expiry. A holder renews it (``check``) before every
destructive batch; if the row no longer carries its owner and token, another process took over
after the lease ran out and this one raises ``LeaseLost`` and stops. Works on SQLite (writers are
serialised by ``BEGIN IMMEDIATE``) and PostgreSQL (``SELECT ... FOR NO KEY UPDATE``; a racing first
insert fails on the primary key and is reported as ``LeaseHeld``).

Transactions: ``acquire``, ``check`` and ``release`` each run one short transaction of their own
and commit it before returning: a fence only fences once it is committed, so they take the engine,
never a caller's session. ``current`` is a plain catalog read on the caller's session.

On takeover the new holder marks the run rows its dead predecessors left ``running`` as
``abandoned`` (``abandon_stale_runs``, issue 13, found 6).
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlmodel import Session, col, select

from weightstore.clock import Clock
from weightstore.db import for_write, session_scope
from weightstore.errors import LeaseHeld, LeaseLost
from weightstore.models import GcRun, GcRunState, Lease

GC_LEASE = "gc"


def new_owner() -> str:
    """host:pid:random — unique per process, readable in ``gc status``."""
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class LeaseHandle:
    engine: Engine
    clock: Clock
    name: str
    owner: str
    token: int
    ttl_seconds: int

    def check(self) -> None:
        """Renew the lease, or raise ``LeaseLost`` if another process holds it now."""
        now = self.clock.now()
        with session_scope(self.engine) as s:
            res = s.execute(
                sa.update(Lease)
                .where(
                    col(Lease.name) == self.name,
                    col(Lease.owner) == self.owner,
                    col(Lease.token) == self.token,
                )
                .values(heartbeat_at=now, expires_at=now + timedelta(seconds=self.ttl_seconds))
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]  # DML yields a CursorResult; sqlmodel types it Result
                raise LeaseLost(f"lease {self.name!r} (token {self.token}) was taken over by another collector")

    def release(self) -> None:
        now = self.clock.now()
        with session_scope(self.engine) as s:
            s.execute(
                sa.update(Lease)
                .where(
                    col(Lease.name) == self.name,
                    col(Lease.owner) == self.owner,
                    col(Lease.token) == self.token,
                )
                .values(expires_at=now)
            )


def acquire(engine: Engine, clock: Clock, *, ttl_seconds: int, owner: str | None = None, name: str = GC_LEASE) -> LeaseHandle:
    """Take the lease if it is free or expired; raise ``LeaseHeld`` if a live holder has it."""
    owner = owner or new_owner()
    now = clock.now()
    try:
        with session_scope(engine) as s:
            q = for_write(select(Lease).where(Lease.name == name))
            row = s.exec(q).first()
            if row is None:
                row = Lease(
                    name=name,
                    owner=owner,
                    token=1,
                    acquired_at=now,
                    heartbeat_at=now,
                    expires_at=now + timedelta(seconds=ttl_seconds),
                )
            elif row.expires_at > now and row.owner != owner:
                raise LeaseHeld(
                    f"lease {name!r} is held by {row.owner} until {row.expires_at.isoformat()}",
                    owner=row.owner,
                    expires_at=row.expires_at.isoformat(),
                )
            else:
                row.owner, row.token = owner, row.token + 1
                row.acquired_at, row.heartbeat_at = now, now
                row.expires_at = now + timedelta(seconds=ttl_seconds)
            s.add(row)
            s.flush()
            token = row.token
    except DBIntegrityError as exc:  # two first-ever acquisitions raced on PostgreSQL
        raise LeaseHeld(f"lease {name!r} was just taken by another collector") from exc
    return LeaseHandle(engine, clock, name, owner, token, ttl_seconds)


def abandon_stale_runs(engine: Engine, clock: Clock, owner: str) -> list[str]:
    """With the lease just taken by ``owner``: mark every other holder's ``running`` run row
    ``abandoned`` and return their ids.

    Only one process holds the lease, so a leased (non-dry) run still ``running`` under another
    owner belongs to a collector that died without recording its end (``kill -9``, a lost machine):
    its row would say ``running`` forever. A holder that is merely slow lost its lease already and
    stops at its next ``check``; its own final record overwrites ours. Dry runs take no lease and
    are left alone: one may be running right now."""
    now = clock.now()
    with session_scope(engine) as s:
        stale = [
            r[0]
            for r in s.execute(
                sa.select(col(GcRun.id)).where(
                    col(GcRun.state) == GcRunState.running.value,
                    col(GcRun.owner).is_not(None),
                    col(GcRun.owner) != owner,
                )
            ).all()
        ]
        if stale:
            s.execute(
                sa.update(GcRun)
                .where(col(GcRun.id).in_(stale), col(GcRun.state) == GcRunState.running.value)
                .values(state=GcRunState.abandoned.value, finished_at=now)
            )
    return stale


def current(session: Session, name: str = GC_LEASE) -> Lease | None:
    """The lease row (holder, token, expiry), or ``None`` if no collector ever ran."""
    return session.get(Lease, name)
