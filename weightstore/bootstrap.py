"""Turn ``Settings`` into a running ``Context``: catalog migrated, object store reachable.

The embedded default (no ``WEIGHTSTORE_S3_ENDPOINT_URL``) starts SeaweedFS on loopback under
``data_dir/s3`` with credentials generated once and kept in ``data_dir/s3-credentials.json``
(mode 600), supervised by ``embedded.SeaweedFS`` (lock, stale-store reclaim, restart); a process
that finds a live owner shares its store. With an endpoint configured, nothing is started.

Who creates what (issue 13, found 1, 2, 5, 9): the bootstrap step (``weightstore admin bootstrap``,
and ``serve`` on the embedded SQLite catalog, which is its own bootstrap) migrates the catalog,
creates the bucket and the first admin key. Every other process (API replicas on a shared catalog,
collectors, export workers) only checks that the bucket exists, so none needs create-bucket rights
and no two replicas race to create anything. ``migrate_catalog`` is safe to run from many processes at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy.pool import NullPool

from weightstore import auth, db
from weightstore.clock import Clock
from weightstore.context import Context
from weightstore.errors import InvalidRequest
from weightstore.objectstore import store_from_settings
from weightstore.settings import Settings

MIGRATION_LOCK_ID = 0x77735F6D696772  # "ws_migr": pg_advisory_lock key held while migrating


def _embedded_credentials(data_dir: Path) -> tuple[str, str]:
    path = data_dir / "s3-credentials.json"
    if path.exists():
        creds = json.loads(path.read_text())
        return creds["access_key"], creds["secret_key"]
    data_dir.mkdir(parents=True, exist_ok=True)
    access, secret = "ws" + secrets.token_hex(8), secrets.token_urlsafe(30)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"access_key": access, "secret_key": secret}, f)
    return access, secret


@contextmanager
def _migration_lock(url: str) -> Iterator[None]:
    """Hold the catalog's migration lock: a PostgreSQL session advisory lock, or an ``flock`` beside
    the SQLite file. Two replicas (or a replica and the bootstrap job) migrating a fresh catalog at
    once would otherwise both run the first CREATE TABLE and one would fail."""
    u = sa.engine.make_url(url)
    if u.get_backend_name() == "postgresql":
        engine = sa.create_engine(url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sa.select(sa.func.pg_advisory_lock(MIGRATION_LOCK_ID)))
                conn.commit()
                try:
                    yield
                finally:
                    conn.execute(sa.select(sa.func.pg_advisory_unlock(MIGRATION_LOCK_ID)))
                    conn.commit()
        finally:
            engine.dispose()
    elif u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        path = Path(u.database)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".migrate-lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    else:
        yield


def migrate_catalog(url: str) -> None:
    """Apply migrations (``alembic upgrade heads``); any number of processes may run it at once."""
    with _migration_lock(url):
        db.upgrade(url)


SESSION_SECRET_REQUIRED = (
    "WEIGHTSTORE_SESSION_SECRET is required when the catalog is not the embedded SQLite one: "
    "every replica must sign admin UI forms with the same secret (e.g. `openssl rand -base64 32`)"
)


def check_replica_settings(settings: Settings) -> None:
    """Refuse (``InvalidRequest``, one line naming the setting) settings that would make replicas of
    one shared catalog disagree: a per-replica admin UI session secret (issue 13, found 5)."""
    if not settings.catalog_is_embedded and settings.session_secret is None:
        raise InvalidRequest(SESSION_SECRET_REQUIRED)


def session_secret(settings: Settings) -> str:
    """The admin UI's CSRF key: ``WEIGHTSTORE_SESSION_SECRET``; on the embedded catalog only, one
    generated once under ``data_dir``. A shared catalog without it is refused, never given a
    per-replica secret (a form from one replica would be refused by the next)."""
    if settings.session_secret:
        return settings.session_secret.get_secret_value()
    check_replica_settings(settings)
    path = settings.data_dir / "session-secret"
    if not path.exists():
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def bootstrap_admin_key(
    ctx: Context, *, rotate: bool = False, before_commit: Callable[[str], None] | None = None
) -> auth.Bootstrapped:
    """The operator tenant and first admin key (``auth.bootstrap_admin``), from
    ``WEIGHTSTORE_INITIAL_ADMIN_KEY`` when set. ``before_commit`` gets a generated key before the
    transaction commits (writing the key file there means a failed write leaves no key nobody has)."""
    initial = ctx.settings.initial_admin_key
    with db.session_scope(ctx.engine) as s:
        result = auth.bootstrap_admin(
            s, now=ctx.clock.now(), initial_key=initial.get_secret_value() if initial else None, rotate=rotate
        )
        if result.api_key is not None and before_commit is not None:
            before_commit(result.api_key)
    return result


EMBEDDED_MARKER = "s3-endpoint.json"
"""Written by the owner of the embedded store while it runs: ``{"endpoint_url", "pid"}``, for
tools outside this package. Which process owns the store is decided by the store's own lock
(``embedded.LOCK_FILE``), not by this file, so a stale marker left by a crash misleads nobody."""


@dataclass
class Running:
    ctx: Context
    stops: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        while self.stops:
            self.stops.pop()()


def start(settings: Settings, *, migrate: bool = True, clock: Clock | None = None, create_bucket: bool | None = None) -> Running:
    """Build the context; start the embedded S3 store if no endpoint is configured.

    ``create_bucket``: create the bucket if missing (the bootstrap step); else only check that it
    exists and fail with ``NotFound`` saying how to create it. Default: create it only in the
    embedded store, which this process owns anyway."""
    stops: list[Callable[[], None]] = []
    if create_bucket is None:
        create_bucket = settings.s3_endpoint_url is None
    if settings.s3_endpoint_url is None:
        access, secret = _embedded_credentials(settings.data_dir)
        from weightstore.embedded import SeaweedFS

        # Own the data dir's store (reclaiming one a crashed owner left running) or, when a live
        # process (`serve`, `gc`, `worker`) owns it, share it and stand by to take it over on the
        # same endpoint if that process goes: the store lives as long as any process using it.
        weed = SeaweedFS(
            settings.data_dir / "s3", access_key=access, secret_key=secret, endpoint_file=settings.data_dir / EMBEDDED_MARKER
        )
        weed.start(share=True)
        endpoint = weed.endpoint_url
        stops.append(weed.stop)
        settings = settings.model_copy(
            update={"s3_endpoint_url": endpoint, "s3_access_key_id": access, "s3_secret_access_key": SecretStr(secret)}
        )
    try:
        url = settings.resolved_database_url
        if migrate:
            migrate_catalog(url)
        engine = db.make_engine(url)
        stops.append(engine.dispose)
        store = store_from_settings(settings)
        if create_bucket:
            store.ensure_bucket()
        else:
            store.require_bucket()
    except BaseException:
        for stop in reversed(stops):
            stop()
        raise
    return Running(Context(settings=settings, engine=engine, store=store, clock=clock or Clock()), stops)
