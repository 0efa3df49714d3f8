"""Shared fixtures: a migrated catalog on SQLite *and* PostgreSQL, a real S3 bucket, a live server.

``db_url`` is parametrised over both backends, so every test that touches the catalog runs twice.
Migrations run once per backend into a template (a file copy for SQLite, ``CREATE DATABASE ...
TEMPLATE`` for PostgreSQL); each test gets its own fresh copy.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from psycopg import sql

from weightstore import auth, db
from weightstore.clock import FakeClock
from weightstore.context import Context
from weightstore.objectstore import ObjectStore, S3Location
from weightstore.settings import Settings

pytest_plugins = ["tests.fixtures_services"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TINKER_TELEMETRY", "0")

BACKENDS = ["sqlite", "postgresql"]

# httpx's module-level helpers (httpx.get/post/...) and bare httpx.Client() default to a 5 s timeout,
# which a loaded 2-core CI machine exceeded (stop 17: a 401 for a bad key, an admin PATCH). Tests check
# answers, not latency: the shared default object is widened once, for every such call at once.
for _field in ("connect", "read", "write", "pool"):
    setattr(httpx._config.DEFAULT_TIMEOUT_CONFIG, _field, 60.0)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    db.upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def pg_template(pg_server) -> str:  # type: ignore[no-untyped-def]
    name = "ws_template"
    db.upgrade(pg_server.create_database(name))
    return name


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A freshly migrated, empty catalog on each backend."""
    if request.param == "sqlite":
        path = tmp_path / "catalog.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    pg = request.getfixturevalue("pg_server")
    template = request.getfixturevalue("pg_template")
    name = f"ws_{uuid.uuid4().hex[:16]}"
    with pg._admin_connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template)))
    yield pg.url(name)
    try:
        pg.drop_database(name)
    except Exception:  # noqa: BLE001 - a leftover test database is harmless
        pass


@pytest.fixture
def settings(db_url: str, s3_server, s3_bucket: str, tmp_path: Path) -> Settings:  # type: ignore[no-untyped-def]
    return Settings(
        database_url=db_url,
        s3_endpoint_url=s3_server.endpoint_url,
        s3_access_key_id=s3_server.access_key,
        s3_secret_access_key=s3_server.secret_key,
        s3_bucket=s3_bucket,
        data_dir=tmp_path / "var",
        multipart_threshold_bytes=5 * 1024 * 1024,
        part_size_bytes=5 * 1024 * 1024,
        log_json=False,
        embedded_gc=False,
        embedded_worker=False,
        session_secret="test-session-secret",
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ctx(settings: Settings, clock: FakeClock) -> Iterator[Context]:
    engine = db.make_engine(settings.resolved_database_url, pool_size=5)
    secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
    store = ObjectStore(
        S3Location(settings.s3_endpoint_url, settings.s3_access_key_id, secret, settings.s3_bucket),
        multipart_threshold=settings.multipart_threshold_bytes,
        part_size=settings.part_size_bytes,
    )
    yield Context(settings=settings, engine=engine, store=store, clock=clock)
    engine.dispose()


@dataclass
class Keys:
    admin: str
    trainer: str
    reader: str
    other_trainer: str  # another tenant


@pytest.fixture
def keys(ctx: Context) -> Keys:
    now = ctx.clock.now()
    with db.session_scope(ctx.engine) as s:
        admin = auth.create_key(s, tenant="ops", role="admin", now=now)[1]
        trainer = auth.create_key(s, tenant="acme", role="trainer", now=now)[1]
        reader = auth.create_key(s, tenant="acme", role="reader", now=now)[1]
        other = auth.create_key(s, tenant="globex", role="trainer", now=now)[1]
    return Keys(admin, trainer, reader, other)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Seen:
    """One request a ``LiveServer`` answered: what a test asserts on instead of timing the client."""

    method: str
    path: str
    status: int
    retry_count: str | None
    """The Tinker SDK's ``x-stainless-retry-count`` header: "0" on a first attempt, absent elsewhere."""


SDK_RETRIED_STATUSES = frozenset({408, 409, 429})
"""Besides every 5xx, the statuses the Tinker SDK retries (``reference/tinker_api.md`` §1.7)."""


class _Recorder:
    """ASGI wrapper appending a ``Seen`` per answered HTTP request."""

    def __init__(self, app, seen: list[Seen]) -> None:  # type: ignore[no-untyped-def]
        self.app, self.seen = app, seen

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        retry = headers.get(b"x-stainless-retry-count")

        async def recording_send(message) -> None:  # type: ignore[no-untyped-def]
            if message["type"] == "http.response.start":
                self.seen.append(
                    Seen(scope["method"], scope["path"], message["status"], retry.decode() if retry is not None else None)
                )
            await send(message)

        return await self.app(scope, receive, recording_send)


class LiveServer:
    """uvicorn serving ``create_app(ctx)`` on a loopback port in a background thread, wired like
    ``weightstore serve``: with the in-process collector behind ``POST /v1/admin/gc/runs``. Every
    answered request is appended to ``seen``."""

    def __init__(self, ctx: Context, background=()) -> None:  # type: ignore[no-untyped-def]
        from weightstore_api.app import create_app
        from weightstore_gc import LocalCollector

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        ctx.settings = ctx.settings.model_copy(update={"public_url": self.url})
        self.app = create_app(ctx, background=background, collector=LocalCollector())
        self.seen: list[Seen] = []
        recorded = _Recorder(self.app, self.seen)
        config = uvicorn.Config(recorded, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("test server did not start")

    @contextmanager
    def answered_without_retries(self) -> Iterator[list[Seen]]:
        """Assert that the Tinker SDK calls made inside the block each reached the server exactly
        once: no answer the SDK would retry (408, 409, 429, 5xx) and no request marked as a retry.
        This replaces "came back within N seconds", which is a property of the machine's load."""
        mark = len(self.seen)
        window: list[Seen] = []
        yield window
        window.extend(self.seen[mark:])
        assert window, "no request reached the server"
        retried = [s for s in window if s.status in SDK_RETRIED_STATUSES or s.status >= 500 or s.retry_count not in (None, "0")]
        assert not retried, f"answers the SDK retries, or retries: {retried}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def server(ctx: Context) -> Iterator[LiveServer]:
    srv = LiveServer(ctx).start()
    yield srv
    srv.stop()


@pytest.fixture
def api(server: LiveServer, keys: Keys) -> Iterator[httpx.Client]:
    """An httpx client authenticated as the trainer of tenant ``acme``."""
    with httpx.Client(base_url=server.url, headers={"X-API-Key": keys.trainer}, timeout=60) as client:
        yield client
