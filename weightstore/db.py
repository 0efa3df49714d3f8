"""Catalog engines (SQLite with WAL and ``BEGIN IMMEDIATE``, or PostgreSQL), ``session_scope``, and migrations.

Transactions (docs/design.md): a catalog function takes ``session: Session`` first and never commits,
rolls back or opens a session; the caller owns the transaction. Only workflows (which interleave
object-store I/O with catalog steps) open ``session_scope``, one short scope per catalog step.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.selectable import GenerativeSelect
from sqlmodel import Session

from weightstore.errors import CatalogBusy, CatalogUnavailable, TransientError

if TYPE_CHECKING:
    from alembic.config import Config

REPO_ROOT = Path(__file__).resolve().parent.parent
CONNECT_TIMEOUT_SECONDS = 10  # PostgreSQL connect; a request waits at most this long for a dead host


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    """An engine for the catalog at ``url``: SQLite tuned for one writer at a time, or a pooled PostgreSQL."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: sqlite3.Connection, _record: object) -> None:
            # WAL lets readers run beside the one writer; foreign keys are off by default in SQLite.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            # pysqlite's deferred BEGIN lets two writers both read then fail to upgrade their lock;
            # BEGIN IMMEDIATE serialises writers up front so "check, then write" is atomic.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        # Let SQLAlchemy (not pysqlite) emit BEGIN, so the hook above decides the lock mode.
        @event.listens_for(engine, "connect")
        def _no_autobegin(dbapi_conn: sqlite3.Connection, _record: object) -> None:
            dbapi_conn.isolation_level = None

        return engine
    # pre-ping: a pooled connection the server closed (restart, failover) is replaced on checkout
    # instead of failing the first request after the catalog is back. connect_timeout: an
    # unreachable host fails a request in seconds (503 catalog_unavailable) instead of hanging it.
    return sa.create_engine(
        url, pool_size=pool_size, max_overflow=20, pool_pre_ping=True, connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS}
    )


# --- row locks ------------------------------------------------------------------------------------
# Every "lock these rows for my writes" goes through ``for_write``: ``SELECT ... FOR NO KEY UPDATE`` on
# PostgreSQL. Two such locks on one row still exclude each other (and any UPDATE/DELETE), but not the
# ``FOR KEY SHARE`` lock PostgreSQL takes on a parent row whenever a child row referencing it is
# inserted (a run or checkpoint of the tenant, a file of the upload). Plain ``FOR UPDATE`` conflicts
# with that: a transaction that had inserted a run of the tenant and then waited on a blob row deadlocked
# with one holding the blob and asking for the tenant's quota lock (CI, stop 17). SQLite renders no
# lock clause: ``BEGIN IMMEDIATE`` already serialises writers. Rows of one table locked in one statement
# are locked in ``order_by`` order, so callers locking several rows sort them by key (one order for all).
WRITE_LOCK: dict[str, bool] = {"key_share": True}  # for ``session.get(Model, id, with_for_update=...)``

_Q = TypeVar("_Q", bound=GenerativeSelect)


def for_write(q: _Q) -> _Q:
    """``q`` locking the rows it reads until the transaction ends (see the comment above)."""
    return q.with_for_update(key_share=True)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """One transaction: committed on success, rolled back on any exception.

    A transient catalog failure leaves as a retryable error (503 + Retry-After), never as a 500 the
    client would take for a permanent failure (``as_transient``): a conflict the database resolved
    by aborting this transaction is ``CatalogBusy``; a catalog that cannot be reached (restarting,
    refusing connections, pool exhausted) is ``CatalogUnavailable``."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except sa_exc.SQLAlchemyError as exc:
            _rollback_quietly(session)
            transient = as_transient(exc)
            if transient is not None:
                raise transient from exc
            raise
        except BaseException:
            _rollback_quietly(session)
            raise


def _rollback_quietly(session: Session) -> None:
    # A rollback on a connection the server just closed raises too; the original error is the news.
    try:
        session.rollback()
    except sa_exc.SQLAlchemyError:
        pass


# SQLSTATEs PostgreSQL uses when it aborts one of two conflicting transactions: retrying succeeds.
TRANSIENT_SQLSTATES = {"40001": "serialization failure", "40P01": "deadlock", "55P03": "lock timeout"}

# SQLSTATEs of a server that is going away, starting up or out of connection slots: the catalog is
# unavailable for a while and the same request succeeds once it is back. Class 08 (connection
# exceptions) is matched as a class.
UNAVAILABLE_SQLSTATES = {
    "57P01": "admin shutdown",
    "57P02": "crash shutdown",
    "57P03": "cannot connect now",
    "53300": "too many connections",
}


def transient_reason(exc: sa_exc.DBAPIError) -> str | None:
    """Why ``exc`` is a transient conflict between transactions, or ``None`` if it is not one."""
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate in TRANSIENT_SQLSTATES:
        return TRANSIENT_SQLSTATES[sqlstate]
    if isinstance(exc, sa_exc.OperationalError) and "database is locked" in str(exc.orig):
        return "sqlite busy"
    return None


def is_transient_conflict(exc: sa_exc.DBAPIError) -> bool:
    return transient_reason(exc) is not None


def unavailable_reason(exc: BaseException) -> str | None:
    """Why ``exc`` says the catalog cannot be reached right now, or ``None`` if it does not.

    The class: a pool that timed out waiting for a connection, a connection SQLAlchemy found dead
    (``connection_invalidated``, ``DisconnectionError``), a PostgreSQL SQLSTATE of class 08 or in
    ``UNAVAILABLE_SQLSTATES``, and a driver ``OperationalError``/``InterfaceError`` without a
    SQLSTATE (psycopg's "connection refused", "server closed the connection unexpectedly",
    "connection is closed": errors raised before any statement reached a server)."""
    if isinstance(exc, sa_exc.TimeoutError):
        return "connection pool timeout"
    if isinstance(exc, sa_exc.DisconnectionError):
        return "connection lost"
    if not isinstance(exc, sa_exc.DBAPIError):
        return None
    if exc.connection_invalidated:
        return "connection lost"
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate in UNAVAILABLE_SQLSTATES:
        return UNAVAILABLE_SQLSTATES[sqlstate]
    if isinstance(sqlstate, str) and sqlstate.startswith("08"):
        return "connection failure"
    is_sqlite = isinstance(exc.orig, sqlite3.Error)
    if sqlstate is None and not is_sqlite and isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)):
        return "cannot reach the catalog"
    return None


def as_transient(exc: BaseException) -> TransientError | None:
    """The retryable core error for a SQLAlchemy error, or ``None`` when it is not transient.

    The one place that classifies database errors: ``session_scope`` raises its answer, and the
    API's error handler applies it to errors raised outside any ``session_scope`` (a dependency's
    ``engine.connect()``, a pool checkout)."""
    if isinstance(exc, sa_exc.DBAPIError):
        reason = transient_reason(exc)
        if reason is not None:
            return CatalogBusy(f"the catalog is busy with a conflicting change ({reason}); retry")
    reason = unavailable_reason(exc)
    if reason is not None:
        return CatalogUnavailable(f"the catalog is unavailable ({reason}); retry")
    return None


def migrations_dir() -> Path:
    """The ``alembic/`` folder: beside the package in a checkout, or in the working directory of an
    installed image (the Dockerfile copies it to /app); ``WEIGHTSTORE_MIGRATIONS_DIR`` overrides."""
    candidates = [os.environ.get("WEIGHTSTORE_MIGRATIONS_DIR"), REPO_ROOT / "alembic", Path.cwd() / "alembic"]
    for c in candidates:
        if c and (Path(c) / "env.py").exists():
            return Path(c)
    raise RuntimeError("alembic migrations not found: set WEIGHTSTORE_MIGRATIONS_DIR")


def alembic_config(url: str) -> Config:
    """Alembic's configuration for ``url``, without an ``alembic.ini`` (tests and ``upgrade`` share it)."""
    from alembic.config import Config  # alembic loads only when migrating

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "heads") -> None:
    """Apply migrations: the only way the schema is created."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)
