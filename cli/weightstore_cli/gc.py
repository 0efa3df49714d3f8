"""``weightstore gc ...``: the collector, against the running service or an explicitly named store.

The CLI never guesses which store it collects (issue 12, part 6):

- **by default** every command goes through the API of the service at ``--url``/``WEIGHTSTORE_URL``
  with an admin key (``--api-key``/``WEIGHTSTORE_API_KEY``): ``POST /v1/admin/gc/runs``,
  ``POST /v1/admin/gc/verify``, ``GET /v1/admin/gc/status``; the server collects its own catalog.
- **``--direct``** runs the collector in this process against the catalog and store named by
  ``--database-url``/``--data-dir`` or ``WEIGHTSTORE_DATABASE_URL``/``WEIGHTSTORE_S3_*``. It never
  creates a store: without an S3 endpoint it only shares the embedded store of an existing data dir
  (one ``weightstore serve`` made), and refuses an empty one.

Every report names what it checked (server URL, catalog URL without password, store and bucket).
``run`` does every phase, ``expire|mark|sweep|orphans`` one each (``sweep`` marks first),
``verify`` checks every storage invariant, ``status`` shows the lease and the last runs, and
``worker`` is the standalone APScheduler loop for production (always direct).

Exit codes (stable, for cron jobs and orchestrators):
  0  done (verify: clean)
  1  error (service, catalog or store unreachable, wrong key)
  2  usage or configuration mistake
  3  lease held elsewhere: another collector is working; nothing was done
  4  lease lost mid-run: another collector took over; this one stopped
  5  findings: verify found broken invariants, or the run stopped fail-closed (nothing deleted)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from weightstore.collector import PHASES
from weightstore_cli.common import (
    FORMAT_OPTION,
    KEY_OPTION,
    URL_OPTION,
    ConfigError,
    client,
    emit,
    err,
    error_line,
    human_bytes,
)

if TYPE_CHECKING:
    from weightstore.context import Context
    from weightstore_gc import CollectorHooks

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_LEASE_HELD, EXIT_LEASE_LOST, EXIT_FINDINGS = 0, 1, 2, 3, 4, 5
RUN_TIMEOUT_S = 6 * 3600  # a run through the API answers when it is done: large stores take long

gc_app = typer.Typer(
    help="Garbage collector: expire, mark, sweep, orphans, verify. Talks to the service at WEIGHTSTORE_URL "
    "with an admin key; --direct runs it here against WEIGHTSTORE_DATABASE_URL / --data-dir.",
    no_args_is_help=True,
    epilog="Exit codes: 0 ok, 1 error, 2 usage, 3 lease held elsewhere, "
    "4 lease lost mid-run, 5 findings (verify failed or run stopped fail-closed).",
)
DRY_RUN = typer.Option(False, "--dry-run", help="Print the plan and its statistics; change nothing.")
DIRECT = typer.Option(False, "--direct", help="Run here against the named catalog/store instead of through the API.")
DATABASE_URL = typer.Option(
    None, "--database-url", envvar="WEIGHTSTORE_DATABASE_URL", help="--direct: the catalog (default: the data dir's SQLite)."
)
DATA_DIR = typer.Option(
    None, "--data-dir", envvar="WEIGHTSTORE_DATA_DIR", help="--direct: data dir of an existing embedded store/catalog."
)


def _checked_lines(checked: dict[str, Any], server: str | None) -> list[str]:
    out = [f"  server:   {server}"] if server else []
    out.append(f"  catalog:  {checked.get('catalog')}")
    out.append(f"  store:    {checked.get('store') or '-'} (bucket {checked.get('bucket')})")
    return out


# --- direct mode --------------------------------------------------------------------------------
def direct_settings(database_url: str | None, data_dir: Path | None) -> Any:
    """Settings for ``--direct``: refuses (``ConfigError``) anything that would create a new store
    or catalog: an embedded store is only shared from a data dir that already holds one."""
    from weightstore.settings import Settings

    overrides: dict[str, Any] = {}
    if database_url:
        overrides["database_url"] = database_url
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    settings = Settings(**overrides)
    root = settings.data_dir.resolve()
    if settings.s3_endpoint_url is None and not (root / "s3-credentials.json").is_file():
        raise ConfigError(
            f"--direct: no weightstore store in {root} (nothing to collect; refusing to create one): "
            "pass --data-dir of an existing `weightstore serve`, or set WEIGHTSTORE_S3_ENDPOINT_URL and "
            "WEIGHTSTORE_DATABASE_URL"
        )
    if settings.database_url is None and not (root / "weightstore.db").is_file():
        raise ConfigError(
            f"--direct: no catalog at {root / 'weightstore.db'} (refusing to create one): "
            "pass --database-url or --data-dir of an existing `weightstore serve`"
        )
    return settings


@contextmanager
def direct_context(database_url: str | None = None, data_dir: Path | None = None) -> Iterator[Context]:
    """A running context over the named catalog and store (see ``direct_settings``)."""
    from weightstore import bootstrap

    settings = direct_settings(database_url, data_dir)
    running = bootstrap.start(settings, migrate=False)
    try:
        yield running.ctx
    finally:
        running.close()


def checked_of(ctx: Context) -> dict[str, str]:
    from sqlalchemy.engine import make_url

    return {
        "catalog": make_url(ctx.settings.resolved_database_url).render_as_string(hide_password=True),
        "store": ctx.settings.s3_endpoint_url or "",
        "bucket": ctx.settings.s3_bucket,
    }


@contextmanager
def _gc_errors(what: str) -> Iterator[None]:
    """One line on stderr and the documented exit code for every failure."""
    from weightstore.errors import LeaseHeld, LeaseLost

    try:
        yield
    except typer.Exit:
        raise
    except LeaseHeld as exc:
        err(f"{what}: lease held elsewhere: {exc.message}")
        raise typer.Exit(EXIT_LEASE_HELD) from None
    except LeaseLost as exc:
        err(f"{what}: lease lost: {exc.message}")
        raise typer.Exit(EXIT_LEASE_LOST) from None
    except Exception as exc:
        line = error_line(exc)
        if line is None:
            raise
        err(f"{what}: {line[0]}")
        raise typer.Exit(line[1]) from None


# --- printing ------------------------------------------------------------------------------------
def _human(key: str, v: Any) -> str:
    if "bytes" in key and isinstance(v, int):
        return f"{v} ({human_bytes(v)})"
    return str(v)


def _print_run(rep: dict[str, Any], checked: dict[str, Any] | None, server: str | None) -> None:
    head = "plan (dry run, nothing changed)" if rep["dry_run"] else f"run {rep['state']}"
    typer.echo(f"gc {rep['run_id']}: {head}")
    if checked is not None or server:
        for line in _checked_lines(checked or {}, server) if checked else [f"  server:   {server}"]:
            typer.echo(line)
    plan, stats = rep.get("plan") or {}, rep.get("stats") or {}
    for phase in rep["phases"]:
        typer.echo(f"  {phase}:")
        for k, v in (plan.get(phase) or {}).items():
            if not isinstance(v, list):  # policy_expire: itemised below, one checkpoint a line
                typer.echo(f"    {k:<22} {_human(k, v)}")
        for item in (plan.get(phase) or {}).get("policy_expire") or []:
            typer.echo(f"    policy expires {item['tinker_path']} ({item['policy']} policy; {item['rule']})")
        if not rep["dry_run"]:
            for k, v in (stats.get(phase) or {}).items():
                typer.echo(f"    done.{k:<17} {_human(k, v)}")
    typer.echo(f"  duration: {stats.get('duration_seconds', 0)} s")
    for f in rep.get("findings") or []:
        typer.echo(f"  FINDING [{f['severity']}] {f['kind']} {f['subject']}: {f['detail']}")


def _finish_run(rep: dict[str, Any], fmt: str, checked: dict[str, Any] | None, server: str | None) -> None:
    if fmt == "json":
        emit({**rep, "checked": {**(checked or {}), **({"server": server} if server else {})}}, "json")
    else:
        _print_run(rep, checked, server)
    errors = [f for f in rep.get("findings") or [] if f.get("severity") == "error"]
    if rep["state"] == "stopped" or errors:
        err("gc: stopped fail-closed: referenced data is missing; nothing was deleted after the finding")
        raise typer.Exit(EXIT_FINDINGS)


def run_phases(
    phases: Sequence[str],
    *,
    dry_run: bool,
    fmt: str,
    hooks: CollectorHooks | None = None,
    database_url: str | None = None,
    data_dir: Path | None = None,
) -> None:
    """``weightstore gc run|expire|... --direct``: run here, print, exit with the documented code.

    ``hooks`` is for tests only (tests/collector/_paused_collector.py stops a real collector
    process at an exact step); the commands never pass any."""
    from weightstore_gc import NO_HOOKS, run

    with _gc_errors("gc"), direct_context(database_url, data_dir) as ctx:
        rep = run(ctx, phases, dry_run=dry_run, hooks=hooks or NO_HOOKS)
        checked = checked_of(ctx)
    out = rep.to_dict()
    out["state"] = str(getattr(rep.state, "value", rep.state))
    _finish_run(out, fmt, checked, None)


def _run_via_api(url: str | None, api_key: str | None, phases: Sequence[str], *, dry_run: bool, fmt: str) -> None:
    with _gc_errors("gc"), client(url, api_key, timeout=RUN_TIMEOUT_S) as c:
        row = c._call("POST", "/v1/admin/gc/runs", json={"phases": list(phases), "dry_run": dry_run})
        server = c.base_url
    rep = {**row, "run_id": row["id"]}
    _finish_run(rep, fmt, None, server)


def _phase_command(phases: list[str], doc: str) -> Any:
    def command(
        dry_run: bool = DRY_RUN,
        fmt: str = FORMAT_OPTION,
        direct: bool = DIRECT,
        database_url: str = DATABASE_URL,
        data_dir: Path = DATA_DIR,
        url: str = URL_OPTION,
        api_key: str = KEY_OPTION,
    ) -> None:
        if direct:
            run_phases(phases, dry_run=dry_run, fmt=fmt, database_url=database_url, data_dir=data_dir)
        else:
            _run_via_api(url, api_key, phases, dry_run=dry_run, fmt=fmt)

    command.__doc__ = doc
    return command


gc_app.command("run")(_phase_command(list(PHASES), "All phases: expire, invoices, mark, sweep, orphans, archives."))
gc_app.command("expire")(_phase_command(["expire"], "TTL-elapsed checkpoints → expired; expired past grace → released."))
gc_app.command("mark")(_phase_command(["mark"], "Save the live set under a run id; fail closed on missing references."))
gc_app.command("sweep")(_phase_command(["sweep"], "Mark, then tombstone and delete blobs unreferenced longer than grace."))
gc_app.command("orphans")(_phase_command(["orphans"], "Close expired uploads; delete row-less objects; abort stale multipart."))
gc_app.command("invoices")(_phase_command(["invoices"], "Freeze every billed tenant's ended months not frozen yet."))
gc_app.command("archives")(_phase_command(["archives"], "Prune archive-cache rows that can never be served again."))


def print_verify(report: dict[str, Any], fmt: str) -> None:
    """A verify report: JSON as is, or a readable block (what was checked, counts, findings)."""
    if fmt == "json":
        emit(report, "json")
        return
    findings = report["findings"]
    errors = sum(1 for f in findings if f.get("severity") == "error")
    verdict = "clean" if report["clean"] else f"{len(findings)} finding(s), {errors} error(s)"
    typer.echo(f"gc verify: {verdict}")
    checked = report.get("checked") or {}
    for line in _checked_lines(checked, checked.get("server")):
        typer.echo(line)
    for k, v in sorted((report.get("stats") or {}).items()):
        typer.echo(f"  {k.replace('_', ' '):<24} {_human(k, v)}")
    if findings:
        typer.echo("")
        emit(findings, fmt, ["severity", "kind", "subject", "detail"])


@gc_app.command("verify")
def verify_cmd(
    hash_sample: int = typer.Option(0, "--hash-sample", help="Re-hash this many referenced blobs."),
    fmt: str = FORMAT_OPTION,
    direct: bool = DIRECT,
    database_url: str = DATABASE_URL,
    data_dir: Path = DATA_DIR,
    url: str = URL_OPTION,
    api_key: str = KEY_OPTION,
) -> None:
    """Check every storage invariant; exit 5 if anything is wrong. Names what it checked."""
    if direct:
        from weightstore_gc import verify

        with _gc_errors("gc verify"), direct_context(database_url, data_dir) as ctx:
            rep = verify(ctx, hash_sample=hash_sample)
            report: dict[str, Any] = {
                "checked": checked_of(ctx),
                "clean": rep.clean,
                "stats": rep.stats,
                "findings": [f.to_dict() for f in rep.findings],
            }
    else:
        with _gc_errors("gc verify"), client(url, api_key, timeout=RUN_TIMEOUT_S) as c:
            report = c._call("POST", "/v1/admin/gc/verify", params={"hash_sample": hash_sample})
            report["checked"] = {"server": c.base_url, **report["checked"]}
    print_verify(report, fmt)
    if any(f.get("severity") == "error" for f in report["findings"]):
        raise typer.Exit(EXIT_FINDINGS)


@gc_app.command("status")
def status_cmd(
    limit: int = typer.Option(10, "--limit"),
    fmt: str = FORMAT_OPTION,
    direct: bool = DIRECT,
    database_url: str = DATABASE_URL,
    data_dir: Path = DATA_DIR,
    url: str = URL_OPTION,
    api_key: str = KEY_OPTION,
) -> None:
    """The lease holder and the last runs."""
    if direct:
        from weightstore import collector
        from weightstore.clock import as_utc
        from weightstore.db import session_scope
        from weightstore_gc import lease

        with _gc_errors("gc status"), direct_context(database_url, data_dir) as ctx, session_scope(ctx.engine) as s:
            held = lease.current(s)
            now = ctx.clock.now()
            lease_row = (
                None
                if held is None
                else {
                    "owner": held.owner,
                    "token": held.token,
                    "heartbeat_at": held.heartbeat_at.isoformat(),
                    "expires_at": held.expires_at.isoformat(),
                    "active": as_utc(held.expires_at) > now,
                }
            )
            runs = [
                {
                    "id": r.id,
                    "phases": r.phases.split(","),
                    "dry_run": r.dry_run,
                    "state": r.state,
                    "started_at": r.started_at.isoformat(),
                    "stats": r.stats,
                    "findings": r.findings,
                }
                for r in collector.list_runs(s, limit=limit)
            ]
            status: dict[str, Any] = {"checked": checked_of(ctx), "lease": lease_row, "runs": runs}
    else:
        with _gc_errors("gc status"), client(url, api_key) as c:
            status = c._call("GET", "/v1/admin/gc/status", params={"limit": limit})
            status["checked"] = {"server": c.base_url, **status["checked"]}
    if fmt == "json":
        emit(status, "json")
        return
    lease_row = status["lease"]
    active = bool(lease_row and lease_row["active"])
    typer.echo("lease: " + (f"held by {lease_row['owner']} until {lease_row['expires_at']}" if active else "free"))
    for line in _checked_lines(status["checked"], status["checked"].get("server")):
        typer.echo(line)
    rows = [
        {
            "run_id": r["id"],
            "phases": ",".join(r["phases"]),
            "dry_run": r["dry_run"],
            "state": r["state"],
            "started_at": r["started_at"],
            "duration_s": (r.get("stats") or {}).get("duration_seconds"),
            "findings": len(r.get("findings") or []),
        }
        for r in status["runs"]
    ]
    emit(rows, fmt, ["run_id", "phases", "dry_run", "state", "started_at", "duration_s", "findings"])


@gc_app.command("worker")
def worker_cmd(
    metrics_port: int = typer.Option(0, "--metrics-port", help="Serve Prometheus metrics on this port (0: off)."),
    first_delay: float = typer.Option(0, "--first-delay", help="Seconds before the first run."),
    database_url: str = DATABASE_URL,
    data_dir: Path = DATA_DIR,
) -> None:
    """Standalone collector loop (production, always direct): runs every WEIGHTSTORE_GC_INTERVAL_SECONDS
    under the lease, against the named catalog and store (never a new one)."""
    import logging

    from weightstore_gc import scheduler
    from weightstore_gc.metrics import GC_REGISTRY

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    with _gc_errors("gc worker"), direct_context(database_url, data_dir) as ctx:
        if metrics_port:
            from prometheus_client import start_http_server

            start_http_server(metrics_port, addr=ctx.settings.host, registry=GC_REGISTRY)
        checked = checked_of(ctx)
        err(
            f"gc worker: every {ctx.settings.gc_interval_seconds} s, grace {ctx.settings.gc_grace_seconds} s; "
            f"catalog {checked['catalog']}, store {checked['store']} bucket {checked['bucket']}"
        )
        scheduler.run_worker(ctx, first_delay=first_delay)


@gc_app.command("default-ttl")
def default_ttl_cmd(
    tenant: str = typer.Argument(..., help="Tenant name or id."),
    training: int = typer.Option(None, "--training", help="Seconds; 0 removes the default."),
    sampler: int = typer.Option(None, "--sampler", help="Seconds; 0 removes the default."),
    fmt: str = FORMAT_OPTION,
    direct: bool = DIRECT,
    database_url: str = DATABASE_URL,
    data_dir: Path = DATA_DIR,
    url: str = URL_OPTION,
    api_key: str = KEY_OPTION,
) -> None:
    """Show or set a tenant's default TTL per kind (applied to new uploads without a ttl)."""
    if direct:
        from weightstore import retention
        from weightstore.db import session_scope

        with _gc_errors("gc default-ttl"), direct_context(database_url, data_dir) as ctx, session_scope(ctx.engine) as s:
            t = retention.set_default_ttl(s, tenant, settings=ctx.settings, training=training, sampler=sampler)
            row: dict[str, Any] = {
                "tenant": t.name,
                "training_seconds": t.default_ttl_training_seconds,
                "sampler_seconds": t.default_ttl_sampler_seconds,
            }
    else:
        body = {"training_seconds": training, "sampler_seconds": sampler}
        with _gc_errors("gc default-ttl"), client(url, api_key) as c:
            row = c._call("PUT", f"/v1/admin/tenants/{tenant}/default-ttl", json=body)
    emit(row, fmt)


def register(app: typer.Typer) -> None:
    app.add_typer(gc_app, name="gc")
