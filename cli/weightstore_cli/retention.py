"""Retention policy and pin commands (issue 12, part 3): ``retention set|show|clear``, ``pin``, ``unpin``.

A policy keeps the newest N checkpoints per kind and/or every K-th (by creation order in the run and
kind); the collector's expire phase expires the rest (``weightstore gc run --dry-run`` lists them
with the rule). A run's policy replaces its tenant's default. A pinned checkpoint never expires.
"""

from __future__ import annotations

from typing import Any

import typer

from weightstore_cli.common import FORMAT_OPTION, KEY_OPTION, URL_OPTION, client, emit, err, handle_errors

retention_app = typer.Typer(
    help="Retention policies: keep the last N / every K-th checkpoint per kind (run or tenant default).",
    no_args_is_help=True,
)

POLICY_COLUMNS = ["scope", "tenant_id", "run_id", "keep_last", "keep_every", "rule", "updated_at"]
RUN_OPTION = typer.Option(None, "--run", help="A run id: its own policy (replaces the tenant default)")
TENANT_OPTION = typer.Option(None, "--tenant", help="A tenant (id or name): its default policy for runs without one")


def _target(run: str | None, tenant: str | None, *, required: bool) -> None:
    if run is not None and tenant is not None:
        err("give --run RUN or --tenant TENANT, not both")
        raise typer.Exit(2)
    if required and run is None and tenant is None:
        err("give --run RUN (a run's policy) or --tenant TENANT (the tenant default)")
        raise typer.Exit(2)


@retention_app.command("set")
def retention_set(
    run: str | None = RUN_OPTION,
    tenant: str | None = TENANT_OPTION,
    keep_last: int | None = typer.Option(None, "--keep-last", min=1, help="Keep the newest N checkpoints per kind"),
    keep_every: int | None = typer.Option(
        None, "--keep-every", min=1, help="Keep every K-th checkpoint per kind (creation order within the run)"
    ),
    url: str = URL_OPTION,
    api_key: str = KEY_OPTION,
    fmt: str = FORMAT_OPTION,
) -> None:
    """Set a run's policy or a tenant default (the newest checkpoint of each kind is always kept;
    a run policy with neither rule keeps everything, whatever the tenant default)."""
    _target(run, tenant, required=True)
    with handle_errors(), client(url, api_key) as c:
        out = c.set_retention(run_id=run, tenant=tenant, keep_last=keep_last, keep_every=keep_every)
    emit(out, fmt, POLICY_COLUMNS)


@retention_app.command("show")
def retention_show(
    run: str | None = RUN_OPTION,
    tenant: str | None = TENANT_OPTION,
    url: str = URL_OPTION,
    api_key: str = KEY_OPTION,
    fmt: str = FORMAT_OPTION,
) -> None:
    """The policy in effect for --run (its own or the tenant default), a --tenant default, or
    (neither) every policy of your tenant (an admin: of every tenant)."""
    _target(run, tenant, required=False)
    with handle_errors(), client(url, api_key) as c:
        out = c.retention(run_id=run, tenant=tenant)
    rows: list[dict[str, Any]]
    if run is None and tenant is None:
        rows = list(out["policies"]) if out else []
    else:
        rows = [out] if out else []
        if not rows and fmt == "table":
            target = f"run {run}" if run else f"tenant {tenant}"
            err(f"no retention policy applies to {target}: checkpoints expire only by TTL")
    emit(rows, fmt, POLICY_COLUMNS)


@retention_app.command("clear")
def retention_clear(
    run: str | None = RUN_OPTION, tenant: str | None = TENANT_OPTION, url: str = URL_OPTION, api_key: str = KEY_OPTION
) -> None:
    """Remove a run's policy (the tenant default applies again) or a tenant default."""
    _target(run, tenant, required=True)
    with handle_errors(), client(url, api_key) as c:
        now = c.clear_retention(run_id=run, tenant=tenant)
    if run is not None:
        err(f"run {run}: {'now under the tenant default (' + now['rule'] + ')' if now else 'no retention policy (TTL only)'}")
    else:
        err(f"tenant {tenant}: default retention policy removed")


def pin(tinker_path: str, url: str = URL_OPTION, api_key: str = KEY_OPTION, fmt: str = FORMAT_OPTION) -> None:
    """Pin a checkpoint: never expired by a retention policy or a TTL (its TTL is cleared)."""
    with handle_errors(), client(url, api_key) as c:
        out = c.pin(tinker_path)
    emit(out, fmt, ["tinker_path", "pinned", "expires_at"])


def unpin(
    tinker_path: str,
    ttl: int | None = typer.Option(
        None, "--ttl", help="Also give it a TTL (seconds from now); its TTL before the pin is not restored"
    ),
    url: str = URL_OPTION,
    api_key: str = KEY_OPTION,
    fmt: str = FORMAT_OPTION,
) -> None:
    """Unpin a checkpoint: retention policies (and --ttl, if given) apply to it again."""
    with handle_errors(), client(url, api_key) as c:
        out = c.unpin(tinker_path, ttl_seconds=ttl)
    emit(out, fmt, ["tinker_path", "pinned", "expires_at"])


def register(app: typer.Typer) -> None:
    app.add_typer(retention_app, name="retention")
    app.command("pin")(pin)
    app.command("unpin")(unpin)
