"""Helpers every CLI module shares: the API client from env/flags, output formatting, errors."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import typer

from weightstore.errors import WeightstoreError

URL_OPTION = typer.Option(None, "--url", envvar="WEIGHTSTORE_URL", help="Service URL (default http://127.0.0.1:8000)")
KEY_OPTION = typer.Option(None, "--api-key", envvar="WEIGHTSTORE_API_KEY", help="API key (tml-...)")
FORMAT_OPTION = typer.Option("table", "--format", "-f", help="table, json or csv")

EXIT_ERROR = 1
EXIT_USAGE = 2


def client(url: str | None, api_key: str | None, **kw: Any) -> Any:
    from weightstore.client import Client

    return Client(url or os.environ.get("WEIGHTSTORE_URL"), api_key or os.environ.get("WEIGHTSTORE_API_KEY"), **kw)


def err(message: str) -> None:
    typer.echo(message, err=True)


@contextmanager
def handle_errors() -> Iterator[None]:
    """Typed errors become one line on stderr and exit 1 (2 for usage mistakes)."""
    try:
        yield
    except WeightstoreError as exc:
        err(f"error [{exc.code}]: {exc.message}")
        raise typer.Exit(EXIT_ERROR) from None
    except (OSError, ValueError) as exc:
        err(f"error: {exc}")
        raise typer.Exit(EXIT_ERROR) from None


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, dict | list):
        return json.dumps(v, sort_keys=True)
    return str(v)


def emit(rows: Sequence[dict[str, Any]] | dict[str, Any], fmt: str, columns: Sequence[str] | None = None) -> None:
    """Print data on stdout as a table, JSON or CSV."""
    if fmt == "json":
        typer.echo(json.dumps(rows, indent=2, sort_keys=True, default=str))
        return
    items = [rows] if isinstance(rows, dict) else list(rows)
    cols = list(columns or (items[0].keys() if items else []))
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(cols)
        for r in items:
            w.writerow([_cell(r.get(c)) for c in cols])
        sys.stdout.write(buf.getvalue())
        return
    if fmt != "table":
        err(f"unknown format {fmt!r} (table, json, csv)")
        raise typer.Exit(EXIT_USAGE)
    widths = [max([len(c)] + [len(_cell(r.get(c))) for r in items]) for c in cols]
    typer.echo("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in items:
        typer.echo("  ".join(_cell(r.get(c)).ljust(w) for c, w in zip(cols, widths, strict=True)))


def confirm(what: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        err(f"refusing to {what} without -y (no terminal to ask)")
        raise typer.Exit(EXIT_USAGE)
    if not typer.confirm(f"{what}?", err=True):
        raise typer.Exit(EXIT_ERROR)


Progress = Callable[[int], None]
