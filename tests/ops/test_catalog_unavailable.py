"""A catalog that restarts or cannot be reached answers 503 + Retry-After, never a 500 (issue 13, found 3).

Real PostgreSQL (``tests.support.localpg``) stopped and started under a running app: every route
(auth lookups in ``session_scope``, a route that opens ``engine.connect()`` itself) answers 503
``catalog_unavailable`` with ``Retry-After`` while it is down, and the same app serves again once it
is back, with no restart (the engine's pre-ping replaces the connections the server closed).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import Request
from fastapi.testclient import TestClient
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from tests.fixtures_services import S3Config
from tests.support.localpg import LocalPostgres
from weightstore import auth, db
from weightstore.context import Context
from weightstore.errors import CatalogBusy, CatalogUnavailable
from weightstore.objectstore import ObjectStore, S3Location
from weightstore.settings import Settings
from weightstore_api.app import create_app


class _Orig(Exception):
    def __init__(self, sqlstate: str | None, text: str) -> None:
        super().__init__(text)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            sa_exc.OperationalError("s", {}, _Orig("57P01", "terminating connection due to administrator command")),
            CatalogUnavailable,
        ),
        (sa_exc.OperationalError("s", {}, _Orig("57P03", "the database system is starting up")), CatalogUnavailable),
        (sa_exc.OperationalError("s", {}, _Orig("08006", "connection failure")), CatalogUnavailable),
        (sa_exc.OperationalError("s", {}, _Orig(None, "connection refused")), CatalogUnavailable),
        (sa_exc.InterfaceError("s", {}, _Orig(None, "the connection is closed")), CatalogUnavailable),
        (sa_exc.TimeoutError("QueuePool limit of size 5 overflow 20 reached"), CatalogUnavailable),
        (sa_exc.DisconnectionError("gone"), CatalogUnavailable),
        (sa_exc.OperationalError("s", {}, _Orig("40P01", "deadlock detected")), CatalogBusy),
        (sa_exc.IntegrityError("s", {}, _Orig("23505", "duplicate key")), type(None)),
        (sa_exc.ProgrammingError("s", {}, _Orig("42P01", "relation does not exist")), type(None)),
        (sa_exc.OperationalError("s", {}, _Orig("57014", "canceling statement due to statement timeout")), type(None)),
    ],
)
def test_which_database_errors_mean_unavailable(exc: Exception, expected: type) -> None:
    """issue 13, found 3: the one classification (``db.as_transient``) of connection-level failures."""
    assert type(db.as_transient(exc)) is expected


@pytest.fixture
def pg_ctx(s3_server: S3Config, s3_bucket: str, tmp_path: Path) -> Iterator[tuple[LocalPostgres, Context]]:
    pg = LocalPostgres()
    pg.start()
    try:
        url = pg.create_database("ws_restart")
        db.upgrade(url)
        settings = Settings(
            database_url=url,
            s3_endpoint_url=s3_server.endpoint_url,
            s3_access_key_id=s3_server.access_key,
            s3_secret_access_key=s3_server.secret_key,
            s3_bucket=s3_bucket,
            data_dir=tmp_path / "var",
            embedded_gc=False,
            embedded_worker=False,
            session_secret="test-session-secret",
        )
        engine = db.make_engine(url, pool_size=2)
        store = ObjectStore(S3Location(s3_server.endpoint_url, s3_server.access_key, s3_server.secret_key, s3_bucket))
        yield pg, Context(settings=settings, engine=engine, store=store)
        engine.dispose()
    finally:
        pg.stop()


def _pg_ctl(pg: LocalPostgres, *args: str) -> None:
    # LocalPostgres.stop() deletes the cluster; a restart keeps it, so drive pg_ctl directly.
    res = pg._run([pg._bin("pg_ctl"), "-D", str(pg.data_dir), "-l", str(pg.log_file), "-w", "-t", "60", *args], timeout=90)
    assert res.returncode == 0, res.stdout + res.stderr


def test_postgres_restart_is_503_with_retry_after_then_recovers(pg_ctx: tuple[LocalPostgres, Context]) -> None:
    """issue 13, found 3: stop PostgreSQL under a running app → 503 catalog_unavailable + Retry-After
    on authenticated routes and on a route that connects outside ``session_scope``; start it → the
    very next call succeeds without restarting the app."""
    pg, ctx = pg_ctx
    with db.session_scope(ctx.engine) as s:
        key = auth.create_key(s, tenant="acme", role="trainer", now=ctx.clock.now())[1]
    app = create_app(ctx)

    @app.get("/test/raw-connect")
    def raw_connect(request: Request) -> dict[str, int]:
        with ctx.engine.connect() as conn:  # outside session_scope: the app-level handler maps it
            return {"one": int(conn.execute(text("select 1")).scalar_one())}

    with TestClient(app, headers={"X-API-Key": key}, raise_server_exceptions=False) as client:
        assert client.get("/v1/whoami").status_code == 200
        assert client.get("/v1/checkpoints").status_code == 200
        assert client.get("/test/raw-connect").json() == {"one": 1}  # the pool now holds live connections

        _pg_ctl(pg, "-m", "fast", "stop")
        for path in ("/v1/whoami", "/v1/checkpoints", "/test/raw-connect"):
            r = client.get(path)
            assert r.status_code == 503, (path, r.status_code, r.text)
            assert r.headers["Retry-After"] == "5"
            assert r.json()["code"] == "catalog_unavailable"
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["problems"]["catalog"] == "OperationalError (cannot reach the catalog)"

        _pg_ctl(pg, "-o", f"-p {pg.port}", "start")
        assert client.get("/v1/whoami").json()["tenant_id"]  # the first call after the restart succeeds
        assert client.get("/v1/checkpoints").status_code == 200
        assert client.get("/test/raw-connect").json() == {"one": 1}
