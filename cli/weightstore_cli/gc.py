"""``weightstore gc ...``: run the collector against the configured catalog and store directly.

These commands read the same ``WEIGHTSTORE_*`` settings as the service (they do not go through
the API): ``run`` does every phase, ``expire|mark|sweep|orphans`` one each (``sweep`` marks first),
``verify`` checks every storage invariant, ``status`` shows the lease and the last runs, and
``worker`` is the standalone APScheduler loop for production.

Exit codes (stable, for cron jobs and orchestrators):
  0  done (verify: clean)
  1  error (catalog or store unreachable, bad configuration)
  2  usage mistake
  3  lease held elsewhere: another collector is working; nothing was done
  4  lease lost mid-run: another collector took over; this one stopped
  5  findings: verify found broken invariants, or the run stopped fail-closed (nothing deleted)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import typer

from weightstore_cli.common import FORMAT_OPTION, emit, err

if TYPE_CHECKING:
    from weightstore_gc import CollectorHooks

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_LEASE_HELD, EXIT_LEASE_LOST, EXIT_FINDINGS = 0, 1, 2, 3, 4, 5

gc_app = typer.Typer(
    help="Garbage collector: expire, mark, sweep, orphans, verify (exit codes: see `gc --help`).",
    no_args_is_help=True,
    epilog="Exit codes: 0 ok, 1 error, 2 usage, 3 lease held elsewhere, "
    "4 lease lost mid-run, 5 findings (verify failed or run stopped fail-closed).",
)
DRY_RUN = typer.Option(False, "--dry-run", help="Print the plan and its statistics; change nothing.")


@contextmanager
def _context() -> Iterator[Any]:
    from weightstore import bootstrap
    from weightstore.settings import Settings

    settings = Settings()
    # The embedded default (SQLite under data_dir) may not be migrated yet; production migrates explicitly.
    running = bootstrap.start(settings, migrate=settings.database_url is None)
    try:
        yield running.ctx
    finally:
        running.close()


def _print_plan(rep: Any) -> None:
    head = "plan (dry run, nothing changed)" if rep.dry_run else f"run {rep.state}"
    typer.echo(f"gc {rep.run_id}: {head}")
    for phase in rep.phases:
        plan = rep.plan.get(phase, {})
        stats = rep.stats.get(phase, {})
        typer.echo(f"  {phase}:")
        for k, v in plan.items():
            typer.echo(f"    {k:<22} {_human(k, v)}")
        if not rep.dry_run:
            for k, v in stats.items():
                typer.echo(f"    done.{k:<17} {_human(k, v)}")
    typer.echo(f"  duration: {rep.stats.get('duration_seconds', 0)} s")
    for f in rep.findings:
        typer.echo(f"  FINDING [{f.severity}] {f.kind} {f.subject}: {f.detail}")


def _human(key: str, v: Any) -> str:
    if "bytes" in key and isinstance(v, int):
        return f"{v} ({v / 1e9:.3f} GB)"
    return str(v)


def run_phases(phases: Sequence[str], *, dry_run: bool, fmt: str, hooks: CollectorHooks | None = None) -> None:
    """``weightstore gc run|expire|mark|sweep|orphans``: run, print, exit with the documented code.

    ``hooks`` is for tests only (tests/collector/_paused_collector.py stops a real collector
    process at an exact step); the commands never pass any."""
    from weightstore.errors import LeaseHeld, LeaseLost, WeightstoreError
    from weightstore.models import GcRunState
    from weightstore_gc import NO_HOOKS, run

    try:
        with _context() as ctx:
            rep = run(ctx, phases, dry_run=dry_run, hooks=hooks or NO_HOOKS)
    except LeaseHeld as exc:
        err(f"gc: lease held elsewhere: {exc.message}")
        raise typer.Exit(EXIT_LEASE_HELD) from None
    except LeaseLost as exc:
        err(f"gc: lease lost: {exc.message}")
        raise typer.Exit(EXIT_LEASE_LOST) from None
    except (WeightstoreError, OSError, ValueError) as exc:
        err(f"gc: error: {exc}")
        raise typer.Exit(EXIT_ERROR) from None
    if fmt == "json":
        emit(rep.to_dict(), "json")
    else:
        _print_plan(rep)
    if rep.state == GcRunState.stopped or rep.errors:
        err("gc: stopped fail-closed: referenced data is missing; nothing was deleted after the finding")
        raise typer.Exit(EXIT_FINDINGS)


def _phase_command(phases: list[str], doc: str) -> Any:
    def command(dry_run: bool = DRY_RUN, fmt: str = FORMAT_OPTION) -> None:
        run_phases(phases, dry_run=dry_run, fmt=fmt)

    command.__doc__ = doc
    return command


gc_app.command("run")(_phase_command(["expire", "mark", "sweep", "orphans"], "All phases: expire, mark, sweep, orphans."))
gc_app.command("expire")(_phase_command(["expire"], "TTL-elapsed checkpoints → expired; expired past grace → released."))
gc_app.command("mark")(_phase_command(["mark"], "Save the live set under a run id; fail closed on missing references."))
gc_app.command("sweep")(_phase_command(["sweep"], "Mark, then tombstone and delete blobs unreferenced longer than grace."))
gc_app.command("orphans")(_phase_command(["orphans"], "Close expired uploads; delete row-less objects; abort stale multipart."))


@gc_app.command("verify")
def verify_cmd(
    hash_sample: int = typer.Option(0, "--hash-sample", help="Re-hash this many referenced blobs."), fmt: str = FORMAT_OPTION
) -> None:
    """Check every storage invariant; exit 5 if anything is wrong."""
    from weightstore_gc import verify

    try:
        with _context() as ctx:
            rep = verify(ctx, hash_sample=hash_sample)
    except (OSError, ValueError, ConnectionError) as exc:
        err(f"gc verify: error: {exc}")
        raise typer.Exit(EXIT_ERROR) from None
    rows = [f.to_dict() for f in rep.findings]
    if fmt == "json":
        emit({"clean": rep.clean, "stats": rep.stats, "findings": rows}, "json")
    else:
        typer.echo(f"verify: {'clean' if rep.clean else f'{len(rows)} finding(s)'} {rep.stats}")
        if rows:
            emit(rows, fmt, ["severity", "kind", "subject", "detail"])
    if rep.errors:
        raise typer.Exit(EXIT_FINDINGS)


@gc_app.command("status")
def status_cmd(limit: int = typer.Option(10, "--limit"), fmt: str = FORMAT_OPTION) -> None:
    """The lease holder and the last runs."""
    from weightstore import collector
    from weightstore.db import session_scope
    from weightstore_gc import lease

    with _context() as ctx, session_scope(ctx.engine) as s:
        held = lease.current(s)
        runs = collector.list_runs(s, limit=limit)
        now = ctx.clock.now()
    lease_row = (
        None
        if held is None
        else {
            "owner": held.owner,
            "token": held.token,
            "heartbeat_at": held.heartbeat_at,
            "expires_at": held.expires_at,
            "active": held.expires_at > now,
        }
    )
    rows = [
        {
            "run_id": r.id,
            "phases": r.phases,
            "dry_run": r.dry_run,
            "state": r.state,
            "started_at": r.started_at,
            "duration_s": (r.stats or {}).get("duration_seconds"),
            "findings": len(r.findings or []),
        }
        for r in runs
    ]
    if fmt == "json":
        emit({"lease": lease_row, "runs": rows}, "json")
        return
    typer.echo(
        "lease: "
        + (
            "free"
            if not lease_row or not lease_row["active"]
            else f"held by {lease_row['owner']} until {lease_row['expires_at'].isoformat()}"
        )
    )
    emit(rows, fmt, ["run_id", "phases", "dry_run", "state", "started_at", "duration_s", "findings"])


@gc_app.command("worker")
def worker_cmd(
    metrics_port: int = typer.Option(0, "--metrics-port", help="Serve Prometheus metrics on this port (0: off)."),
    first_delay: float = typer.Option(0, "--first-delay", help="Seconds before the first run."),
) -> None:
    """Standalone collector loop (production): runs every WEIGHTSTORE_GC_INTERVAL_SECONDS under the lease."""
    import logging

    from weightstore_gc import scheduler
    from weightstore_gc.metrics import GC_REGISTRY

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    with _context() as ctx:
        if metrics_port:
            from prometheus_client import start_http_server

            start_http_server(metrics_port, addr=ctx.settings.host, registry=GC_REGISTRY)
        err(f"gc worker: every {ctx.settings.gc_interval_seconds} s, grace {ctx.settings.gc_grace_seconds} s")
        scheduler.run_worker(ctx, first_delay=first_delay)


@gc_app.command("default-ttl")
def default_ttl_cmd(
    tenant: str = typer.Argument(..., help="Tenant name or id."),
    training: int = typer.Option(None, "--training", help="Seconds; 0 removes the default."),
    sampler: int = typer.Option(None, "--sampler", help="Seconds; 0 removes the default."),
    fmt: str = FORMAT_OPTION,
) -> None:
    """Show or set a tenant's default TTL per kind (applied to new uploads without a ttl)."""
    from weightstore import retention
    from weightstore.db import session_scope

    try:
        with _context() as ctx, session_scope(ctx.engine) as s:
            t = retention.set_default_ttl(s, tenant, settings=ctx.settings, training=training, sampler=sampler)
            row = {
                "tenant": t.name,
                "training_seconds": t.default_ttl_training_seconds,
                "sampler_seconds": t.default_ttl_sampler_seconds,
            }
    except Exception as exc:  # noqa: BLE001 - one line on stderr
        err(f"gc default-ttl: error: {exc}")
        raise typer.Exit(EXIT_ERROR) from None
    emit(row, fmt)


def register(app: typer.Typer) -> None:
    app.add_typer(gc_app, name="gc")
