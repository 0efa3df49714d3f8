"""``weightstore tenants create|ls|set|disable|enable|delete``: tenant administration through the
tenants API (admin key). The rules live in ``weightstore.tenants``; this module parses flags and prints.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

import typer

from weightstore_cli.common import (
    BYTES_OPTION,
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

tenants_app = typer.Typer(help="Tenants (admin): create, list, change price and quotas, disable, delete.", no_args_is_help=True)

COLUMNS = ["tenant_id", "name", "state", "operator", "price_per_gb_month_usd", "used_bytes", "soft_quota_bytes", "quota_bytes"]
CLEAR = "none"
"""The value that clears a price override or a quota in ``tenants set``."""
_SIZE = re.compile(r"^\s*(\d+)\s*(B|kB|KB|MB|GB|TB|PB|KiB|MiB|GiB|TiB|PiB)?\s*$")
_UNITS = {
    None: 1,
    "B": 1,
    "kB": 10**3,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "PB": 10**15,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
    "PiB": 2**50,
}

PRICE_HELP = "Price override in USD per GB-month (GB = 1e9 bytes); 'none' in `set` returns to the list price."
QUOTA_HELP = "Hard quota on logical bytes (e.g. 500000000000 or 500GB); uploads past it are refused. 'none' in `set` removes it."
SOFT_HELP = "Warning threshold in bytes (admin UI and /metrics only); 'none' in `set` removes it."


def _usage(message: str) -> None:
    err(f"error: {message}")
    raise typer.Exit(EXIT_USAGE)


def parse_size(flag: str, value: str) -> int | None:
    """``none`` → None; ``123``, ``500GB``, ``2TiB`` → bytes."""
    if value.strip().lower() == CLEAR:
        return None
    m = _SIZE.match(value)
    if m is None:
        _usage(f"{flag} {value!r}: expected a number of bytes (e.g. 500000000000, 500GB, 2TiB) or 'none'")
        raise AssertionError  # unreachable: _usage exits
    return int(m[1]) * _UNITS[m[2]]


def parse_price(value: str) -> float | None:
    if value.strip().lower() == CLEAR:
        return None
    try:
        price = Decimal(value)
    except InvalidOperation:
        price = Decimal("NaN")
    if not price.is_finite() or price < 0:
        _usage(f"--price-per-gb-month {value!r}: expected a price in USD such as 0.021, or 'none'")
    return float(price)


def _show(row: dict[str, Any], fmt: str, raw_bytes: bool) -> None:
    emit(row, fmt, COLUMNS, raw_bytes=raw_bytes)


@tenants_app.command("create")
def create(
    name: str,
    price: str = typer.Option(None, "--price-per-gb-month", help=PRICE_HELP),
    quota: str = typer.Option(None, "--quota-bytes", help=QUOTA_HELP),
    soft_quota: str = typer.Option(None, "--soft-quota-bytes", help=SOFT_HELP),
    raw_bytes: bool = BYTES_OPTION,
    fmt: str = FORMAT_OPTION,
    url: str | None = URL_OPTION,
    api_key: str | None = KEY_OPTION,
) -> None:
    """Create tenant NAME (its permanent id). Keys for it: weightstore keys create --tenant NAME."""
    body: dict[str, Any] = {"name": name}
    if price is not None:
        body["price_per_gb_month_usd"] = parse_price(price)
    if quota is not None:
        body["quota_bytes"] = parse_size("--quota-bytes", quota)
    if soft_quota is not None:
        body["soft_quota_bytes"] = parse_size("--soft-quota-bytes", soft_quota)
    with handle_errors(), client(url, api_key) as c:
        row = c._call("POST", "/v1/tenants", json=body)
    _show(row, fmt, raw_bytes)
    err(f"created tenant {row['tenant_id']}")


@tenants_app.command("ls")
def ls(
    all_: bool = typer.Option(False, "--all", "-a", help="Include deleted tenants."),
    raw_bytes: bool = BYTES_OPTION,
    fmt: str = FORMAT_OPTION,
    url: str | None = URL_OPTION,
    api_key: str | None = KEY_OPTION,
) -> None:
    """Every tenant with its state, price override, quota usage and quotas."""
    with handle_errors(), client(url, api_key) as c:
        out = c._call("GET", "/v1/tenants", params={"include_deleted": str(all_).lower()})
    emit(out["tenants"], fmt, COLUMNS, raw_bytes=raw_bytes)


@tenants_app.command("set")
def set_(
    name: str,
    new_name: str = typer.Option(None, "--name", help="New display name (the tenant id never changes)."),
    price: str = typer.Option(None, "--price-per-gb-month", help=PRICE_HELP),
    quota: str = typer.Option(None, "--quota-bytes", help=QUOTA_HELP),
    soft_quota: str = typer.Option(None, "--soft-quota-bytes", help=SOFT_HELP),
    raw_bytes: bool = BYTES_OPTION,
    fmt: str = FORMAT_OPTION,
    url: str | None = URL_OPTION,
    api_key: str | None = KEY_OPTION,
) -> None:
    """Change tenant NAME's display name, price override or quotas (only the flags given change)."""
    body: dict[str, Any] = {}
    if new_name is not None:
        body["name"] = new_name
    if price is not None:
        body["price_per_gb_month_usd"] = parse_price(price)
    if quota is not None:
        body["quota_bytes"] = parse_size("--quota-bytes", quota)
    if soft_quota is not None:
        body["soft_quota_bytes"] = parse_size("--soft-quota-bytes", soft_quota)
    if not body:
        _usage("nothing to change: give --name, --price-per-gb-month, --quota-bytes or --soft-quota-bytes")
    with handle_errors(), client(url, api_key) as c:
        row = c._call("PATCH", f"/v1/tenants/{name}", json=body)
    _show(row, fmt, raw_bytes)
    err(f"updated tenant {row['tenant_id']}: {', '.join(sorted(body))}")


@tenants_app.command("disable")
def disable(name: str, url: str | None = URL_OPTION, api_key: str | None = KEY_OPTION) -> None:
    """Refuse every key of tenant NAME until it is enabled again (nothing is deleted)."""
    with handle_errors(), client(url, api_key) as c:
        row = c._call("POST", f"/v1/tenants/{name}/disable")
    err(f"disabled tenant {row['tenant_id']}: its keys are refused until `weightstore tenants enable {row['tenant_id']}`")


@tenants_app.command("enable")
def enable(name: str, url: str | None = URL_OPTION, api_key: str | None = KEY_OPTION) -> None:
    """Accept tenant NAME's keys again."""
    with handle_errors(), client(url, api_key) as c:
        row = c._call("POST", f"/v1/tenants/{name}/enable")
    err(f"enabled tenant {row['tenant_id']}")


@tenants_app.command("delete")
def delete(
    name: str,
    yes: bool = typer.Option(False, "-y", "--yes", help="Do not ask."),
    url: str | None = URL_OPTION,
    api_key: str | None = KEY_OPTION,
) -> None:
    """Delete tenant NAME: its checkpoints (billed up to now; bytes reclaimed by the collector), uploads,
    exports and keys. The tenant stays listed as deleted so its invoices remain readable."""
    confirm(f"delete tenant {name} and every checkpoint it stores", yes)
    with handle_errors(), client(url, api_key) as c:
        row = c._call("DELETE", f"/v1/tenants/{name}")
    err(
        f"deleted tenant {row['tenant_id']}: {row['checkpoints_deleted']} checkpoints deleted (bytes reclaimed by the "
        f"collector), {row['keys_revoked']} keys revoked, {row['uploads_aborted']} uploads aborted, "
        f"{row['exports_cancelled']} exports cancelled; its invoices stay readable"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(tenants_app, name="tenants")
