"""``weightstore billing usage|invoice``: read usage and invoices through the billing API.

An admin key reads any tenant (all of them when ``--tenant`` is left out); any other key reads its own.
"""

from __future__ import annotations

from typing import Any

import typer

from weightstore_cli.common import FORMAT_OPTION, KEY_OPTION, URL_OPTION, client, emit, err, handle_errors

billing_app = typer.Typer(help="Storage usage and invoices (GB = 1e9 bytes; 1 GB-month = 720 GB-hours).", no_args_is_help=True)


@billing_app.command("usage")
def usage(
    tenant: str | None = typer.Option(None, "--tenant", help="Tenant (default: all for admins, else your own)"),
    since: str | None = typer.Option(None, "--since", help="Start (ISO date or datetime, UTC); default 30 days ago"),
    until: str | None = typer.Option(None, "--until", help="End, exclusive (ISO); default now"),
    group_by: str = typer.Option("tenant_id", "--group-by", help="comma-separated: tenant_id, run_id, kind"),
    bucket: str = typer.Option("none", "--bucket", help="day, hour or none"),
    fmt: str = FORMAT_OPTION,
    url: str | None = URL_OPTION,
    api_key: str | None = KEY_OPTION,
) -> None:
    """Usage (GB-hours) and cost over a window, per group (and per day or hour)."""
    params: dict[str, Any] = {"group_by": group_by, "bucket": bucket}
    for k, v in (("tenant", tenant), ("since", since), ("until", until)):
        if v:
            params[k] = v
    with handle_errors(), client(url, api_key) as c:
        out = c._call("GET", "/v1/billing/usage", params=params)
    if fmt == "json":
        emit(out, fmt)
        return
    emit(out["rows"], fmt)
    err(f"{out['start']} .. {out['end']}: total {out['total_cost_usd']} USD (each row rounded half-even to the cent)")


@billing_app.command("invoice")
def invoice(
    tenant: str = typer.Option(..., "--tenant"),
    month: str = typer.Option(..., "--month", help="YYYY-MM (UTC)"),
    fmt: str = FORMAT_OPTION,
    url: str | None = URL_OPTION,
    api_key: str | None = KEY_OPTION,
) -> None:
    """A tenant's invoice for one calendar month: a line per (run, kind)."""
    with handle_errors(), client(url, api_key) as c:
        out = c._call("GET", f"/v1/billing/tenants/{tenant}/invoices/{month}")
    if fmt == "json":
        emit(out, fmt)
        return
    emit(out["lines"], fmt, columns=["run_id", "kind", "gb_hours", "rate_usd_per_gb_month", "amount_usd"])
    err(f"invoice {out['tenant_id']} {out['month']}: total {out['total_usd']} USD")


def register(app: typer.Typer) -> None:
    app.add_typer(billing_app, name="billing")
