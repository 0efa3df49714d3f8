"""Core commands: serve, keys, runs, upload, download, ls, rm, ttl."""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Any

import typer

from weightstore_cli.common import (
    BYTES_OPTION,
    EXIT_ERROR,
    EXIT_USAGE,
    FORMAT_OPTION,
    KEY_OPTION,
    URL_OPTION,
    client,
    confirm,
    emit,
    err,
    handle_errors,
)

keys_app = typer.Typer(help="API keys: create (admin), list, revoke, rotate.", no_args_is_help=True)
runs_app = typer.Typer(help="Training runs.", no_args_is_help=True)

CKPT_COLUMNS = ["checkpoint", "size_bytes", "created_at", "expires_at"]  # table, under a tinker://RUN/ heading
CKPT_DATA_COLUMNS = ["tinker_path", "kind", "size_bytes", "created_at", "expires_at"]  # csv


def serve() -> None:
    """Run the service (embedded default: SQLite + a local SeaweedFS under ./var; or the configured
    PostgreSQL and S3). On the embedded SQLite catalog, serve is its own bootstrap: it creates the
    bucket and, on first start, prints a bootstrap admin key. On a shared catalog (PostgreSQL) it
    creates nothing: run `weightstore admin bootstrap` once, and set WEIGHTSTORE_SESSION_SECRET."""
    import uvicorn

    from weightstore import auth, bootstrap
    from weightstore.db import session_scope
    from weightstore.errors import WeightstoreError
    from weightstore.settings import Settings
    from weightstore_api.app import Background, create_app
    from weightstore_api.observability import configure_logging

    settings = Settings()
    try:
        bootstrap.check_replica_settings(settings)
    except WeightstoreError as exc:
        err(f"error: {exc.message}")
        raise typer.Exit(EXIT_USAGE) from None
    # Bind first: a busy port is one line and exit 1, before any bootstrap key or store is made.
    sock = bind_port(settings.host, settings.port)
    port = int(sock.getsockname()[1])
    configure_logging(settings.log_level, settings.log_json)
    err(f"weightstore: starting (data dir {settings.data_dir.resolve()})")
    # Replicas of a shared catalog create nothing (no bucket, no key): the bootstrap job does.
    self_bootstrap = settings.catalog_is_embedded
    try:
        running = bootstrap.start(settings, migrate=settings.auto_migrate, create_bucket=self_bootstrap or None)
    except WeightstoreError as exc:
        sock.close()
        err(f"error [{exc.code}]: {exc.message}")
        raise typer.Exit(EXIT_ERROR) from None
    ctx = running.ctx
    admin_key = bootstrap.bootstrap_admin_key(ctx).api_key if self_bootstrap else None
    if not self_bootstrap:
        with session_scope(ctx.engine) as s:
            if not auth.has_admin_key(s, now=ctx.clock.now()):
                err("weightstore: no admin key yet: run `weightstore admin bootstrap` once for this catalog")
    background: list[Background] = []
    collector = None  # POST /v1/admin/gc/runs answers 400 unsupported without one
    try:
        from weightstore_gc import LocalCollector
        from weightstore_gc.scheduler import start_in_process as start_gc

        collector = LocalCollector()
        if settings.embedded_gc:
            background.append(start_gc)
    except ImportError:
        if settings.embedded_gc:
            err("weightstore: collector not available; skipping in-process GC")
    if settings.embedded_worker:
        try:
            from weightstore.worker import start_in_process as start_worker

            background.append(start_worker)
        except ImportError:
            err("weightstore: export worker not available; skipping in-process worker")
    # Stopped last by the app's lifespan: uvicorn re-raises SIGTERM after a graceful shutdown, so
    # code after uvicorn.run() is not a reliable place to stop the embedded S3 store.
    background.insert(0, lambda _ctx: running.close)
    app = create_app(ctx, background=background, collector=collector)
    url = f"http://{settings.host}:{port}"
    typer.echo(f"weightstore listening on {url}", err=True)
    typer.echo(f"  S3 store: {ctx.settings.s3_endpoint_url} (bucket {settings.s3_bucket})", err=True)
    typer.echo(f"  catalog:  {settings.resolved_database_url.split('@')[-1]}", err=True)
    if admin_key:
        typer.echo(f"  bootstrap admin key (shown once): {admin_key}", err=True)
        typer.echo(f"  export WEIGHTSTORE_URL={url} WEIGHTSTORE_API_KEY={admin_key}", err=True)
    try:
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        server.run(sockets=[sock])
    finally:
        sock.close()
        running.close()


def bind_port(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or one line on stderr and exit 1 (nothing else printed)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            err(f"port {port} is in use; set WEIGHTSTORE_PORT")
        else:
            err(f"cannot listen on {host}:{port} ({exc.strerror}); set WEIGHTSTORE_HOST and WEIGHTSTORE_PORT")
        raise typer.Exit(1) from None
    sock.set_inheritable(True)
    return sock


def migrate() -> None:
    """Apply catalog migrations (alembic upgrade heads) to WEIGHTSTORE_DATABASE_URL or the embedded SQLite."""
    from weightstore import bootstrap
    from weightstore.settings import Settings

    url = Settings().resolved_database_url
    bootstrap.migrate_catalog(url)  # locked: safe while replicas or a bootstrap job migrate too
    err(f"catalog migrated: {url.split('@')[-1]}")


@keys_app.command("create")
def keys_create(
    tenant: str = typer.Option(..., "--tenant"),
    role: str = typer.Option("trainer", "--role"),
    name: str = typer.Option(None, "--name"),
    create_tenant: bool = typer.Option(False, "--create-tenant", help="Create TENANT if it does not exist (else refused)."),
    url: str = URL_OPTION,
    api_key: str = KEY_OPTION,
    fmt: str = FORMAT_OPTION,
) -> None:
    """Create an API key for TENANT with ROLE trainer|reader|admin. Prints the key once. An unknown
    TENANT is refused unless --create-tenant (or create it first: weightstore tenants create)."""
    body = {"tenant": tenant, "role": role, "name": name, "create_tenant": create_tenant}
    with handle_errors(), client(url, api_key) as c:
        row = c._call("POST", "/v1/keys", json=body)
    if fmt == "json":
        emit(row, fmt)
    else:
        typer.echo(row["api_key"])
        err(f"created {role} key {row['key_id']} for tenant {tenant} (shown once)")


@keys_app.command("ls")
def keys_ls(url: str = URL_OPTION, api_key: str = KEY_OPTION, fmt: str = FORMAT_OPTION) -> None:
    with handle_errors(), client(url, api_key) as c:
        rows = c._call("GET", "/v1/keys")
    emit(rows, fmt, ["key_id", "tenant_id", "role", "prefix", "name", "created_at", "revoked_at"])


@keys_app.command("revoke")
def keys_revoke(
    key_id: str, yes: bool = typer.Option(False, "-y", "--yes"), url: str = URL_OPTION, api_key: str = KEY_OPTION
) -> None:
    """Revoke KEY_ID. Any key may revoke itself; a trainer key also revokes trainer and reader keys of
    its tenant; an admin key revokes any key. Nobody revokes the last active admin key."""
    confirm(f"revoke key {key_id}", yes)
    with handle_errors(), client(url, api_key) as c:
        c._call("DELETE", f"/v1/keys/{key_id}")
    err(f"revoked {key_id}")


@keys_app.command("rotate")
def keys_rotate(
    key_id: str,
    grace: int = typer.Option(0, "--grace", min=0, help="SECONDS the old key keeps working (default 0: revoked at once)."),
    url: str = URL_OPTION,
    api_key: str = KEY_OPTION,
    fmt: str = FORMAT_OPTION,
) -> None:
    """Replace KEY_ID by a new key of the same tenant, role and name; prints the new key once. The
    old key stops working after --grace SECONDS. Whoever may revoke a key may rotate it."""
    with handle_errors(), client(url, api_key) as c:
        row = c._call("POST", f"/v1/keys/{key_id}/rotate", json={"grace_seconds": grace})
    if fmt == "json":
        emit(row, fmt)
        return
    typer.echo(row["api_key"])
    old = row["replaced"]
    until = "now" if grace == 0 else f"at {old['revoked_at']} (grace {grace}s)"
    new = f"new {row['role']} key {row['key_id']} for tenant {row['tenant_id']} (shown once)"
    err(f"rotated {old['key_id']}: {new}; {old['key_id']} stops working {until}")


@runs_app.command("create")
def runs_create(
    base_model: str = typer.Option(..., "--base-model"),
    rank: int = typer.Option(None, "--rank"),
    run_id: str = typer.Option(None, "--run-id"),
    url: str = URL_OPTION,
    api_key: str = KEY_OPTION,
    fmt: str = FORMAT_OPTION,
) -> None:
    """Create a training run; prints its id."""
    with handle_errors(), client(url, api_key) as c:
        run = c.create_run(base_model, run_id=run_id, lora_rank=rank)
    if fmt == "json":
        emit(run, fmt)
    else:
        typer.echo(run["run_id"])


@runs_app.command("ls")
def runs_ls(
    limit: int = typer.Option(100, "--limit"), url: str = URL_OPTION, api_key: str = KEY_OPTION, fmt: str = FORMAT_OPTION
) -> None:
    with handle_errors(), client(url, api_key) as c:
        rows = c.list_runs(limit=limit)["runs"]
    emit(rows, fmt, ["run_id", "base_model", "lora_rank", "created_at", "last_request_time"])


@runs_app.command("show")
def runs_show(run: str, url: str = URL_OPTION, api_key: str = KEY_OPTION, fmt: str = FORMAT_OPTION) -> None:
    """A run, its visible checkpoints per kind (count, bytes) and its unfinished export jobs."""
    with handle_errors(), client(url, api_key) as c:
        d = c._call("GET", f"/v1/runs/{run}")
    if fmt != "table":
        emit(d, fmt)
        return
    emit(d, fmt, ["run_id", "base_model", "lora_rank", "trainable", "created_at", "checkpoint_count", "size_bytes"])
    if d["kinds"]:
        emit(d["kinds"], fmt, ["kind", "count", "size_bytes"])
    if d["active_exports"]:
        err(f"export jobs queued or running: {', '.join(d['active_exports'])}")


@runs_app.command("rm")
def runs_rm(run: str, yes: bool = typer.Option(False, "-y", "--yes"), url: str = URL_OPTION, api_key: str = KEY_OPTION) -> None:
    """Delete RUN and all its checkpoints (bytes reclaimed by the collector). Refused while export
    jobs of the run are queued or running."""
    confirm(f"delete run {run} and all its checkpoints", yes)
    with handle_errors(), client(url, api_key) as c:
        res = c._call("DELETE", f"/v1/runs/{run}")
    err(f"deleted run {run} ({res['checkpoints_deleted']} checkpoint(s))")


def upload(
    directory: Path = typer.Argument(..., exists=True, file_okay=False),
    run: str = typer.Option(..., "--run"),
    kind: str = typer.Option(..., "--kind", help="state (full state) or sampler"),
    name: str = typer.Option(..., "--name"),
    ttl: int = typer.Option(None, "--ttl", help="TTL in seconds"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    transfer: str = typer.Option("auto", "--transfer", help="auto (presigned, else through the service), presigned or stream"),
    url: str = URL_OPTION,
    api_key: str = KEY_OPTION,
    fmt: str = FORMAT_OPTION,
) -> None:
    """Upload a checkpoint directory; prints its tinker:// path."""
    kinds = {"state": "training", "training": "training", "sampler": "sampler"}
    if kind not in kinds:
        err("--kind must be state or sampler")
        raise typer.Exit(EXIT_USAGE)
    check_checkpoint_dir(directory, kind)
    with handle_errors(), client(url, api_key, transfer=transfer) as c:
        res = c.upload_dir(directory, run_id=run, kind=kinds[kind], name=name, ttl_seconds=ttl, overwrite=overwrite)
    if fmt == "json":
        emit(res, fmt)
    else:
        typer.echo(res["tinker_path"])
        err(f"committed {res['checkpoint']['size_bytes']} bytes ({res['bytes_received']} transferred)")


def check_checkpoint_dir(directory: Path, kind: str) -> None:
    """Refuse (one line, exit 2) a directory that cannot be a checkpoint of ``kind`` (``state``/``training``
    or ``sampler``), naming the files it must hold, before anything is hashed or sent."""
    from weightstore.formats import REQUIRED_FILES

    label = "sampler" if kind == "sampler" else "state"
    required = REQUIRED_FILES["sampler" if kind == "sampler" else "training"]
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}
    missing = [f for f in required if f not in present]
    if not missing:
        return
    what = "is empty" if not present else "lacks " + ", ".join(missing)
    err(f"{directory} {what}: a {label} checkpoint directory must hold {', '.join(required)}")
    raise typer.Exit(EXIT_USAGE)


def download(tinker_path: str, dest: Path, url: str = URL_OPTION, api_key: str = KEY_OPTION) -> None:
    """Download every file of a checkpoint into DEST, verifying sha256 (resumes partial files)."""
    with handle_errors(), client(url, api_key) as c:
        out = c.download(tinker_path, dest)
    typer.echo(str(out))


def ls(
    run: str = typer.Option(None, "--run"),
    kind: str = typer.Option(None, "--kind"),
    limit: int = typer.Option(100, "--limit"),
    raw_bytes: bool = BYTES_OPTION,
    url: str = URL_OPTION,
    api_key: str = KEY_OPTION,
    fmt: str = FORMAT_OPTION,
) -> None:
    """List checkpoints, newest first (sizes human-readable; --bytes for raw counts)."""
    with handle_errors(), client(url, api_key) as c:
        rows: list[dict[str, Any]] = c.list_checkpoints(run_id=run, kind=kind, limit=limit)["checkpoints"]
    if fmt != "table":
        emit(rows, fmt, CKPT_DATA_COLUMNS)
        return
    # Tinker paths are ~85 characters: a table of whole paths cannot fit 100 columns, and a
    # shortened path cannot be copied. So: one heading per run (tinker://RUN/), then its checkpoints.
    by_run: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        head, _, rest = r["tinker_path"].removeprefix("tinker://").partition("/")
        by_run.setdefault(head, []).append({**r, "checkpoint": rest})
    for i, (run_id, items) in enumerate(by_run.items()):
        typer.echo(("\n" if i else "") + f"tinker://{run_id}/")
        emit(items, fmt, CKPT_COLUMNS, raw_bytes=raw_bytes)


def rm(
    tinker_path: str, yes: bool = typer.Option(False, "-y", "--yes"), url: str = URL_OPTION, api_key: str = KEY_OPTION
) -> None:
    """Delete a checkpoint (invisible at once; bytes reclaimed by the collector)."""
    confirm(f"delete {tinker_path}", yes)
    with handle_errors(), client(url, api_key) as c:
        c.delete(tinker_path)
    err(f"deleted {tinker_path}")


def ttl(
    tinker_path: str,
    seconds: int = typer.Option(None, "--ttl", help="TTL in seconds, counted from now."),
    seconds_alias: int = typer.Option(None, "--seconds", hidden=True),  # the flag's old name
    remove: bool = typer.Option(False, "--remove"),
    url: str = URL_OPTION,
    api_key: str = KEY_OPTION,
    fmt: str = FORMAT_OPTION,
) -> None:
    """Set a checkpoint's TTL (--ttl S, counted from now) or remove it (--remove)."""
    seconds = seconds if seconds is not None else seconds_alias
    if (seconds is None) == (not remove):
        err("give exactly one of --ttl S or --remove")
        raise typer.Exit(EXIT_USAGE)
    with handle_errors(), client(url, api_key) as c:
        row = c.set_ttl(tinker_path, None if remove else seconds)
    emit(row, fmt, ["tinker_path", "expires_at"])


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("migrate")(migrate)
    app.add_typer(keys_app, name="keys")
    app.add_typer(runs_app, name="runs")
    app.command("upload")(upload)
    app.command("download")(download)
    app.command("ls")(ls)
    app.command("rm")(rm)
    app.command("ttl")(ttl)
