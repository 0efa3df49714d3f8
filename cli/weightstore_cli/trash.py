"""Trash bin commands (issue 12, part 4): ``trash ls`` and ``restore TINKER_PATH [--ttl S]``.

A checkpoint is in the trash from the moment its TTL passes until the collector collects it. The
"restorable until" column is the guaranteed bound (expiry + the collector's grace period); past it,
a restore still works until the collector's next run, shown as "until collected (by ...)".
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import typer

from weightstore_cli.common import BYTES_OPTION, FORMAT_OPTION, KEY_OPTION, URL_OPTION, client, emit, err, handle_errors

trash_app = typer.Typer(help="Expired checkpoints that can still be restored.", no_args_is_help=True)

TRASH_COLUMNS = ["tinker_path", "expired_at", "restorable_until", "size_bytes"]


def _minutes(iso: str) -> str:
    return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def restorable_until(entry: dict[str, Any], now: datetime) -> str:
    """The table cell: the guaranteed bound, or, once past it, "until collected (by <when>)"."""
    if datetime.fromisoformat(entry["restorable_until"]) > now:
        return _minutes(entry["restorable_until"])
    return f"until collected (by {_minutes(entry['collected_by'])})"


@trash_app.command("ls")
def trash_ls(url: str = URL_OPTION, api_key: str = KEY_OPTION, fmt: str = FORMAT_OPTION, raw_bytes: bool = BYTES_OPTION) -> None:
    """List your tenant's expired checkpoints that can still be restored, most recently expired first."""
    with handle_errors(), client(url, api_key) as c:
        rows: list[dict[str, Any]] = c._call("GET", "/v1/trash")["checkpoints"]
    if fmt != "table":
        emit(rows, fmt, [*TRASH_COLUMNS, "collected_by", "checkpoint_id", "kind"])
        return
    if not rows:
        err("the trash is empty")
        return
    now = datetime.now(UTC)
    table = [{**r, "expired_at": _minutes(r["expired_at"]), "restorable_until": restorable_until(r, now)} for r in rows]
    emit(table, fmt, TRASH_COLUMNS, raw_bytes=raw_bytes)


def restore(
    tinker_path: str,
    ttl: int = typer.Option(None, "--ttl", help="New TTL in seconds, counted from now (default: no expiry)"),
    url: str = URL_OPTION,
    api_key: str = KEY_OPTION,
    fmt: str = FORMAT_OPTION,
) -> None:
    """Restore an expired checkpoint from the trash (see `weightstore trash ls`)."""
    with handle_errors(), client(url, api_key) as c:
        row = c._call("POST", "/v1/trash/restore", json={"path": tinker_path, "ttl_seconds": ttl})
    if fmt == "json":
        emit(row, fmt)
        return
    typer.echo(row["tinker_path"])
    err(f"restored {row['tinker_path']} (expires {row['expires_at'] or 'never'})")


def register(app: typer.Typer) -> None:
    app.add_typer(trash_app, name="trash")
    app.command("restore")(restore)
