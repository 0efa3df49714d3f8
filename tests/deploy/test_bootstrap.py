"""Deployment bootstrap (issue 13, found 1, 2, 5 and the bucket half of 9): a race-free bootstrap of
the first admin key, ``weightstore admin bootstrap``, ``WEIGHTSTORE_INITIAL_ADMIN_KEY``, key
rotation, a session secret shared by replicas, and bucket creation only in the bootstrap step."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from sqlmodel import col, select
from typer.testing import CliRunner

from tests.conftest import LiveServer, free_port
from tests.fixtures_services import _empty_and_delete_bucket
from tests.security.test_keys_and_sessions import _form_token
from weightstore import auth, bootstrap, db
from weightstore.clock import utcnow
from weightstore.context import Context
from weightstore.errors import AuthenticationFailed, InvalidRequest, NotFound
from weightstore.models import ApiKey, Tenant
from weightstore.settings import Settings
from weightstore_cli import app as cli_app

REPLICAS = 8
INITIAL_KEY = "tml-" + "k" * 43


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty, never migrated catalog on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def new_bucket(s3_server) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """The name of a bucket that does not exist yet (deleted afterwards if a test made it)."""
    name = f"ws-boot-{uuid.uuid4().hex[:16]}"
    yield name
    try:
        _empty_and_delete_bucket(s3_server.client(), name)
    except Exception:  # noqa: BLE001 - the test did not create it
        pass


def _bucket_exists(s3_server, name: str) -> bool:  # type: ignore[no-untyped-def]
    return any(b["Name"] == name for b in s3_server.client().list_buckets()["Buckets"])


def _admin_rows(url: str) -> tuple[list[Tenant], list[ApiKey]]:
    engine = db.make_engine(url)
    try:
        with db.session_scope(engine) as s:
            tenants = list(s.exec(select(Tenant).where(col(Tenant.operator).is_(True))))
            admin_keys = list(s.exec(select(ApiKey).where(ApiKey.role == "admin").order_by(col(ApiKey.created_at))))
    finally:
        engine.dispose()
    return tenants, admin_keys


# --- found 1: concurrent bootstraps -----------------------------------------------------------------
def test_concurrent_bootstraps_make_one_tenant_and_one_key(fresh_url: str, tmp_path: Path) -> None:
    """Issue 13, found 1: replicas starting at the same moment on a fresh catalog all succeed (migrations
    and bootstrap), and exactly one operator tenant and one bootstrap admin key exist afterwards."""
    barrier = threading.Barrier(REPLICAS)
    outcomes: list[object] = []

    def replica() -> None:
        try:
            barrier.wait()
            bootstrap.migrate_catalog(fresh_url)
            engine = db.make_engine(fresh_url)
            try:
                settings = Settings(database_url=fresh_url, data_dir=tmp_path)
                ctx = Context(settings=settings, engine=engine, store=None)  # type: ignore[arg-type]  # no store used
                outcomes.append(bootstrap.bootstrap_admin_key(ctx))
            finally:
                engine.dispose()
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            outcomes.append(exc)

    threads = [threading.Thread(target=replica) for _ in range(REPLICAS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [o for o in outcomes if isinstance(o, Exception)]
    assert errors == []
    made = [o for o in outcomes if isinstance(o, auth.Bootstrapped) and o.key_id is not None]
    assert len(outcomes) == REPLICAS and len(made) == 1
    tenants, admin_keys = _admin_rows(fresh_url)
    assert [t.id for t in tenants] == ["admin"]
    assert [(k.id, k.name, k.tenant_id, k.revoked_at) for k in admin_keys] == [(made[0].key_id, "bootstrap", "admin", None)]


def test_ensure_tenant_twice_in_parallel_transactions(db_url: str, clock) -> None:  # type: ignore[no-untyped-def]
    """Issue 13, found 1 (the class): creating the same tenant from two transactions at once is not
    a duplicate-key error for the second; both get the one row."""
    engine = db.make_engine(db_url)
    barrier = threading.Barrier(4)
    got: list[object] = []

    def create() -> None:
        try:
            with db.session_scope(engine) as s:
                barrier.wait(timeout=10)  # all four look before any inserts
                got.append(auth.ensure_tenant(s, "acme", now=clock.now()).id)
        except Exception as exc:  # noqa: BLE001
            got.append(exc)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.dispose()
    assert got == ["acme"] * 4


# --- found 2: weightstore admin bootstrap ---------------------------------------------------------------
def _env(url: str, s3_server, bucket: str, data_dir: Path, **extra: str | None) -> dict[str, str | None]:  # type: ignore[no-untyped-def]
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("WEIGHTSTORE_")}
    env.update(
        WEIGHTSTORE_DATABASE_URL=url,
        WEIGHTSTORE_S3_ENDPOINT_URL=s3_server.endpoint_url,
        WEIGHTSTORE_S3_ACCESS_KEY_ID=s3_server.access_key,
        WEIGHTSTORE_S3_SECRET_ACCESS_KEY=s3_server.secret_key,
        WEIGHTSTORE_S3_BUCKET=bucket,
        WEIGHTSTORE_DATA_DIR=str(data_dir),
    )
    env.update(extra)
    return env


def _authenticates(url: str, key: str) -> bool:
    engine = db.make_engine(url)
    try:
        with db.session_scope(engine) as s:
            auth.authenticate(s, key, now=utcnow())
        return True
    except AuthenticationFailed:
        return False
    finally:
        engine.dispose()


def test_admin_bootstrap_cli(fresh_url: str, s3_server, new_bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Issue 13, found 2: `weightstore admin bootstrap` migrates, creates the bucket and prints the
    first admin key once; a second run creates and prints nothing; --rotate --key-file writes a new
    key (mode 600) and revokes the old one."""
    runner = CliRunner()
    env = _env(fresh_url, s3_server, new_bucket, tmp_path / "var")
    where = fresh_url.split("@")[-1]
    head = f"catalog migrated: {where}\nbucket {new_bucket} ready at {s3_server.endpoint_url}\n"

    first = runner.invoke(cli_app, ["admin", "bootstrap"], env=env)
    assert first.exit_code == 0, first.output
    _, [row] = _admin_rows(fresh_url)
    key = first.stdout.strip()
    assert first.stdout == key + "\n" and key.startswith("tml-") and len(key) == 47
    assert first.stderr == head + f"created admin key {row.id} for tenant admin (shown once)\n"
    assert _bucket_exists(s3_server, new_bucket)
    assert row.key_hash == auth.hash_key(key) and _authenticates(fresh_url, key)

    second = runner.invoke(cli_app, ["admin", "bootstrap"], env=env)
    assert second.exit_code == 0, second.output
    assert second.stdout == ""
    assert second.stderr == head + (
        "an admin key exists already: nothing created (--rotate makes a new bootstrap key and revokes the old one)\n"
    )
    assert [k.id for k in _admin_rows(fresh_url)[1]] == [row.id]

    key_file = tmp_path / "secrets" / "admin-key"
    key_file.parent.mkdir()
    third = runner.invoke(cli_app, ["admin", "bootstrap", "--rotate", "--key-file", str(key_file)], env=env)
    assert third.exit_code == 0, third.output
    _, [old, new] = _admin_rows(fresh_url)
    assert third.stdout == ""
    assert third.stderr == head + (
        f"created admin key {new.id} for tenant admin, written to {key_file} (mode 600)\nrevoked bootstrap key(s): {row.id}\n"
    )
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    new_key = key_file.read_text().strip()
    assert old.id == row.id and old.revoked_at is not None and new.revoked_at is None
    assert _authenticates(fresh_url, new_key) and not _authenticates(fresh_url, key)
    assert sorted(p.name for p in key_file.parent.iterdir()) == ["admin-key"]  # no temporary file left


def test_initial_admin_key_from_environment(fresh_url: str, s3_server, new_bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Issue 13, found 2: WEIGHTSTORE_INITIAL_ADMIN_KEY is installed (hashed, never echoed) by the
    bootstrap; a malformed one is refused in one line; a second run leaves it as it is."""
    runner = CliRunner()
    env = _env(fresh_url, s3_server, new_bucket, tmp_path / "var", WEIGHTSTORE_INITIAL_ADMIN_KEY=INITIAL_KEY)
    res = runner.invoke(cli_app, ["admin", "bootstrap"], env=env)
    assert res.exit_code == 0, res.output
    _, [row] = _admin_rows(fresh_url)
    assert res.stdout == "" and INITIAL_KEY not in res.stderr
    assert res.stderr.splitlines()[-1] == f"installed admin key {row.id} for tenant admin from WEIGHTSTORE_INITIAL_ADMIN_KEY"
    assert row.key_hash == auth.hash_key(INITIAL_KEY) and _authenticates(fresh_url, INITIAL_KEY)

    again = runner.invoke(cli_app, ["admin", "bootstrap"], env=env)
    assert again.exit_code == 0 and again.stdout == ""
    assert [k.id for k in _admin_rows(fresh_url)[1]] == [row.id]
    rotate_to_same = runner.invoke(cli_app, ["admin", "bootstrap", "--rotate"], env=env)
    assert rotate_to_same.exit_code == 1
    assert rotate_to_same.stderr.splitlines()[-1] == (
        f"error [already_exists]: WEIGHTSTORE_INITIAL_ADMIN_KEY is (or was) key {row.id}: set a new key to rotate to"
    )

    bad = runner.invoke(cli_app, ["admin", "bootstrap"], env={**env, "WEIGHTSTORE_INITIAL_ADMIN_KEY": "tml-short"})
    assert bad.exit_code == 1 and bad.stdout == ""
    assert "initial_admin_key must look like an API key: tml- then at least 32 url-safe characters" in bad.stderr
    assert "Traceback" not in bad.output


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_serve_in_embedded_mode_uses_the_initial_key(settings, clock) -> None:  # type: ignore[no-untyped-def]
    """Issue 13, found 2: the embedded bootstrap (what `serve` on SQLite runs) installs the provided key too."""
    settings = settings.model_copy(update={"initial_admin_key": SecretStr(INITIAL_KEY)})
    engine = db.make_engine(settings.resolved_database_url)
    ctx = Context(settings=settings, engine=engine, store=None, clock=clock)  # type: ignore[arg-type]
    first = bootstrap.bootstrap_admin_key(ctx)
    assert first.key_id is not None and first.api_key is None
    assert bootstrap.bootstrap_admin_key(ctx) == auth.Bootstrapped(key_id=None, api_key=None)
    engine.dispose()
    assert _authenticates(settings.resolved_database_url, INITIAL_KEY)


# --- found 2: key rotation ------------------------------------------------------------------------
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_keys_rotate(server, keys, ctx, clock) -> None:  # type: ignore[no-untyped-def]
    """Issue 13, found 2: `keys rotate` (API and CLI) issues a key of the same tenant and role; the old
    key works through its grace, then not; the revocation rules decide who may rotate what."""
    runner = CliRunner()

    def key_id(key: str) -> str:
        with db.session_scope(ctx.engine) as s:
            return auth.authenticate(s, key, now=clock.now()).key_id

    def status(key: str) -> int:
        return httpx.get(server.url + "/v1/runs", headers={"X-API-Key": key}).status_code

    def rotate(key: str, target: str, grace: int = 0) -> httpx.Response:
        return httpx.post(server.url + f"/v1/keys/{target}/rotate", json={"grace_seconds": grace}, headers={"X-API-Key": key})

    trainer_id = key_id(keys.trainer)
    env = {"WEIGHTSTORE_URL": server.url, "WEIGHTSTORE_API_KEY": keys.admin}
    res = runner.invoke(cli_app, ["keys", "rotate", trainer_id, "--grace", "60"], env=env)
    assert res.exit_code == 0, res.output
    new_key = res.stdout.strip()
    new_id = key_id(new_key)
    listed = {k["key_id"]: k for k in httpx.get(server.url + "/v1/keys", headers={"X-API-Key": keys.admin}).json()}
    assert {k: listed[new_id][k] for k in ("tenant_id", "role", "revoked_at")} == {
        "tenant_id": "acme",
        "role": "trainer",
        "revoked_at": None,
    }
    with db.session_scope(ctx.engine) as s:
        old_row = s.get(ApiKey, trainer_id)
    assert old_row is not None and old_row.revoked_at == clock.now() + timedelta(seconds=60)
    assert res.stderr == (
        f"rotated {trainer_id}: new trainer key {new_id} for tenant acme (shown once); "
        f"{trainer_id} stops working at {listed[trainer_id]['revoked_at']} (grace 60s)\n"
    )
    assert status(keys.trainer) == 200 and status(new_key) == 200
    clock.advance(61)
    assert status(keys.trainer) == 401 and status(new_key) == 200

    again = rotate(keys.admin, trainer_id)
    assert again.status_code == 400 and again.json()["code"] == "invalid_request"
    reader_id = key_id(keys.reader)
    assert rotate(keys.reader, new_id).json()["code"] == "forbidden"  # a reader rotates only itself
    assert rotate(keys.other_trainer, reader_id).json()["code"] == "not_found"  # another tenant's key
    assert rotate(keys.admin, reader_id, grace=31 * 24 * 3600).json()["code"] == "invalid_request"
    own = rotate(keys.reader, reader_id)
    assert own.status_code == 201 and own.json()["role"] == "reader" and own.json()["replaced"]["key_id"] == reader_id
    assert status(keys.reader) == 401 and status(own.json()["api_key"]) == 200


# --- found 5: one session secret for every replica ------------------------------------------------------
def test_shared_catalog_needs_the_session_secret(tmp_path: Path) -> None:
    """Issue 13, found 5: on a shared (PostgreSQL) catalog, `serve` refuses to start without
    WEIGHTSTORE_SESSION_SECRET (one line naming it) and no per-replica secret is ever generated."""
    pg = Settings(database_url="postgresql+psycopg://ws@127.0.0.1:1/ws", data_dir=tmp_path / "var")
    with pytest.raises(InvalidRequest) as exc:
        bootstrap.session_secret(pg)
    assert str(exc.value) == bootstrap.SESSION_SECRET_REQUIRED and not (tmp_path / "var").exists()
    embedded = Settings(data_dir=tmp_path / "var")
    assert bootstrap.session_secret(embedded) == bootstrap.session_secret(embedded)  # kept under data_dir

    env = {k: None for k in os.environ if k.startswith("WEIGHTSTORE_")}
    env.update(WEIGHTSTORE_DATABASE_URL=pg.database_url, WEIGHTSTORE_DATA_DIR=str(tmp_path / "var"))
    res = CliRunner().invoke(cli_app, ["serve"], env=env)
    assert res.exit_code == 2
    assert res.stdout == "" and res.stderr == f"error: {bootstrap.SESSION_SECRET_REQUIRED}\n"


def test_sign_in_on_one_replica_works_on_the_next(settings, ctx, keys) -> None:  # type: ignore[no-untyped-def]
    """Issue 13, found 5: two app instances on one catalog, each with its own data dir: a sign-in form
    from replica 1 is accepted by replica 2, and the session cookie it sets opens replica 1."""
    other = Context(
        settings=settings.model_copy(update={"data_dir": settings.data_dir.parent / "replica2"}),
        engine=db.make_engine(settings.resolved_database_url),
        store=ctx.store,
        clock=ctx.clock,
    )
    one, two = LiveServer(ctx).start(), LiveServer(other).start()
    try:
        with httpx.Client(follow_redirects=False, timeout=30) as browser:
            form = browser.get(one.url + "/admin/login")
            signed = browser.post(
                two.url + "/admin/login",
                data={"api_key": keys.admin, "csrf_token": _form_token(form.text)},
                headers={"Origin": two.url},
            )
            assert signed.status_code == 303 and signed.headers["location"] == "/admin"
            page = browser.get(one.url + "/admin")
            assert page.status_code == 200
            out = browser.post(
                two.url + "/admin/logout", data={"csrf_token": _form_token(page.text)}, headers={"Origin": two.url}
            )
            assert out.status_code == 303 and out.headers["location"] == "/admin/login"
            assert browser.get(one.url + "/admin").headers["location"] == "/admin/login"
    finally:
        one.stop()
        two.stop()
        other.engine.dispose()


# --- found 9 (bucket half): only the bootstrap creates the bucket ----------------------------------------
def test_only_the_bootstrap_creates_the_bucket(settings, s3_server, new_bucket: str) -> None:  # type: ignore[no-untyped-def]
    """Issue 13, found 9: API/collector/worker processes (``bootstrap.start`` without
    ``create_bucket``, external store) check the bucket and fail with a clear message; they never
    create it. The bootstrap step does; readiness (``ping``) names the missing bucket too."""
    missing = settings.model_copy(update={"s3_bucket": new_bucket})
    with pytest.raises(NotFound) as exc:
        bootstrap.start(missing, migrate=False)
    assert str(exc.value) == (
        f"bucket {new_bucket} does not exist at {s3_server.endpoint_url}: "
        "create it with `weightstore admin bootstrap` (or set WEIGHTSTORE_S3_BUCKET)"
    )
    assert not _bucket_exists(s3_server, new_bucket)
    running = bootstrap.start(missing, migrate=False, create_bucket=True)
    try:
        assert _bucket_exists(s3_server, new_bucket)
        running.ctx.store.ping()
    finally:
        running.close()
    role = bootstrap.start(missing, migrate=False)  # now it exists: a role starts
    role.close()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_serve_on_a_shared_catalog_does_not_create_the_bucket(settings, s3_server, new_bucket: str) -> None:  # type: ignore[no-untyped-def]
    """Issue 13, found 9: `serve` on PostgreSQL with a missing bucket exits 1 with one line saying how
    to create it, and creates neither the bucket nor an admin key."""
    env = _env(settings.resolved_database_url, s3_server, new_bucket, settings.data_dir)
    env.update(WEIGHTSTORE_SESSION_SECRET="s" * 32, WEIGHTSTORE_PORT=str(free_port()), WEIGHTSTORE_LOG_JSON="false")
    child_env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    # A child process: serve configures logging for the whole process.
    res = subprocess.run(
        [sys.executable, "-m", "weightstore_cli", "serve"], env=child_env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 1, res.stderr
    assert res.stdout == "" and "Traceback" not in res.stderr
    assert res.stderr.splitlines()[-1] == (
        f"error [not_found]: bucket {new_bucket} does not exist at {s3_server.endpoint_url}: "
        "create it with `weightstore admin bootstrap` (or set WEIGHTSTORE_S3_BUCKET)"
    )
    assert not _bucket_exists(s3_server, new_bucket)
    assert _admin_rows(settings.resolved_database_url)[1] == []
