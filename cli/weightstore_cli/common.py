"""Helpers every CLI module shares: the target (URL + key) from flags/env, output formatting, errors.

The CLI never guesses its target: ``target()`` resolves ``--url``/``WEIGHTSTORE_URL`` (default
``http://127.0.0.1:8000``) and ``--api-key``/``WEIGHTSTORE_API_KEY`` once, refuses a URL without a
scheme, and ``handle_errors()`` turns every connection, configuration and typed error into one line
on stderr that says what to do (never a traceback).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import typer

from weightstore.errors import AuthenticationFailed, Forbidden, ServiceUnavailable, WeightstoreError

DEFAULT_URL = "http://127.0.0.1:8000"
URL_OPTION = typer.Option(None, "--url", envvar="WEIGHTSTORE_URL", help=f"Service URL (default {DEFAULT_URL})")
KEY_OPTION = typer.Option(None, "--api-key", envvar="WEIGHTSTORE_API_KEY", help="API key (tml-...)")
FORMAT_OPTION = typer.Option("table", "--format", "-f", help="table, json or csv")
BYTES_OPTION = typer.Option(False, "--bytes", help="Raw byte counts instead of human-readable sizes (tables only).")

EXIT_ERROR = 1
EXIT_USAGE = 2
TABLE_WIDTH = 100
"""Tables fit a 100-column terminal: the widest columns are shortened (middle ellipsis) to fit;
``--format json|csv`` always carries full values."""

KEY_FIX = "set WEIGHTSTORE_API_KEY or pass --api-key"


class ConfigError(Exception):
    """A local configuration mistake (bad URL, missing key): one line on stderr, exit 2."""


@dataclass(frozen=True)
class Target:
    """The service a command talks to: what ``--url``/``--api-key`` (or their env vars) name."""

    url: str
    api_key: str | None


_current: list[Target] = []  # the target of the command running now, for error messages


def check_url(url: str) -> str:
    """``url`` without a trailing slash, or ``ConfigError`` when it has no http(s) scheme or host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        example = "http://" + (url.split("://")[-1] or "HOST:8000")
        raise ConfigError(f"WEIGHTSTORE_URL/--url {url!r} needs a scheme and a host, e.g. {example}")
    return url.rstrip("/")


def target(url: str | None, api_key: str | None, *, need_key: bool = True) -> Target:
    """Resolve and check the target; remembered for ``handle_errors``'s messages."""
    # several API replicas may be named, comma-separated (the client fails over between them)
    resolved = ",".join(check_url(u.strip()) for u in (url or os.environ.get("WEIGHTSTORE_URL") or DEFAULT_URL).split(","))
    key = api_key or os.environ.get("WEIGHTSTORE_API_KEY") or None
    if need_key and not key:
        raise ConfigError(f"no API key: {KEY_FIX}")
    t = Target(resolved, key)
    _current[:] = [t]
    return t


def client(url: str | None, api_key: str | None, **kw: Any) -> Any:
    """A ``weightstore.client.Client`` for the checked target (progress bars: auto, on a terminal)."""
    from weightstore.client import Client

    t = target(url, api_key)
    # Interactive: one pass over the replicas, no waiting, unless WEIGHTSTORE_RETRY_DEADLINE_SECONDS says so.
    kw.setdefault("retry_deadline", float(os.environ.get("WEIGHTSTORE_RETRY_DEADLINE_SECONDS") or 0))
    return Client(t.url, t.api_key, **kw)


def err(message: str) -> None:
    typer.echo(message, err=True)


def _where() -> str:
    return _current[0].url if _current else (os.environ.get("WEIGHTSTORE_URL") or DEFAULT_URL)


def error_line(exc: BaseException) -> tuple[str, int] | None:
    """The one line (and exit code) for a connection, configuration or typed error; None for others."""
    import httpx

    if isinstance(exc, ConfigError):
        return f"error: {exc}", EXIT_USAGE
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return f"error: WEIGHTSTORE_URL/--url {_where()!r} is not a valid http(s) URL", EXIT_USAGE
    refused = httpx.ConnectError | httpx.ConnectTimeout
    if isinstance(exc, refused) or (isinstance(exc, ServiceUnavailable) and isinstance(exc.__cause__, refused)):
        return (
            f"error: no weightstore server at {_where()} (connection refused); start `weightstore serve` or set WEIGHTSTORE_URL",
            EXIT_ERROR,
        )
    if isinstance(exc, httpx.TimeoutException):
        return f"error: {_where()} did not answer in time ({type(exc).__name__}); check the server and retry", EXIT_ERROR
    if isinstance(exc, httpx.HTTPError):
        return f"error: talking to {_where()}: {exc}", EXIT_ERROR
    if isinstance(exc, AuthenticationFailed):
        return f"error [{exc.code}]: {_strip_status(exc.message)}; {KEY_FIX}", EXIT_ERROR
    if isinstance(exc, Forbidden):
        return f"error [{exc.code}]: {_strip_status(exc.message)}; use a key with that role ({KEY_FIX})", EXIT_ERROR
    if isinstance(exc, WeightstoreError):
        return f"error [{exc.code}]: {exc.message}", EXIT_ERROR
    if isinstance(exc, OSError | ValueError):
        return f"error: {exc}", EXIT_ERROR
    return None


def _strip_status(message: str) -> str:
    """The server's message without the client's ``(HTTP 401)`` suffix: the fix follows instead."""
    head, sep, tail = message.rpartition(" (HTTP ")
    return head if sep and tail.endswith(")") else message


@contextmanager
def handle_errors() -> Iterator[None]:
    """Connection, configuration and typed errors become one line on stderr with the fix; exit 1
    (2 for usage/configuration mistakes). Anything else is a bug and keeps its traceback."""
    try:
        yield
    except typer.Exit:
        raise
    except Exception as exc:
        line = error_line(exc)
        if line is None:
            raise
        err(line[0])
        raise typer.Exit(line[1]) from None


# --- output ---------------------------------------------------------------------------------------
def plain_number(v: Decimal) -> str:
    """A Decimal as a plain decimal string: ``0.000000007``, never ``7E-9``."""
    return format(v, "f")


def human_bytes(n: int) -> str:
    """Decimal units (as billing counts GB): ``999 B``, ``1.5 kB``, ``12.3 MB``, ``2.0 GB``."""
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        value /= 1000
        if value < 999.95 or unit == "PB":
            return f"{value:.1f} {unit}"
    return f"{n} B"  # unreachable


def _is_bytes_column(name: str) -> bool:
    return name.endswith("bytes") or name == "size"


def _json_default(v: Any) -> Any:
    if isinstance(v, Decimal):
        return plain_number(v)
    if isinstance(v, datetime):
        return v.isoformat()
    return str(v)


_EXPONENT = re.compile(r"^-?\d+(\.\d+)?E[+-]?\d+$")


def _plain(v: Any) -> Any:
    """Recursively: Decimals and exponent-notation numeric strings/floats as plain decimals."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, Decimal):
        return plain_number(v)
    if isinstance(v, float) and "e" in repr(v):
        return plain_number(Decimal(repr(v)))
    if isinstance(v, str) and _EXPONENT.match(v):
        return plain_number(Decimal(v))  # a Decimal the server sent as str(): "7E-9"
    return v


def _cell(v: Any, *, column: str = "", raw_bytes: bool = True, table: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return ("yes" if v else "no") if table else str(v)
    if not raw_bytes and _is_bytes_column(column) and isinstance(v, int):
        return human_bytes(v)
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M") if table else v.isoformat()
    if table and column.endswith("_at") and isinstance(v, str) and len(v) >= 16 and v[4] == "-" and v[10] == "T":
        return v[:10] + " " + v[11:16]  # ISO instant from JSON: minutes are enough in a table (UTC)
    if isinstance(v, dict | list):
        return json.dumps(_plain(v), sort_keys=True)
    if isinstance(v, Decimal | float):
        return str(_plain(v))
    if isinstance(v, str):
        return str(_plain(v))
    return str(v)


def _shorten(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    if width <= 1:
        return text[:width]
    keep = width - 1
    return text[: keep - keep // 2] + "…" + text[len(text) - keep // 2 :]


def _fit(widths: list[int], budget: int) -> list[int]:
    """Shrink the widest columns one character at a time until the row fits ``budget``; the first
    column (the row's identifier, which people copy) is never shortened."""
    widths = list(widths)
    while len(widths) > 1 and sum(widths) + 2 * (len(widths) - 1) > budget:
        i = max(range(1, len(widths)), key=lambda j: widths[j])
        if widths[i] <= 8:
            break
        widths[i] -= 1
    return widths


def emit(
    rows: Sequence[dict[str, Any]] | dict[str, Any],
    fmt: str,
    columns: Sequence[str] | None = None,
    *,
    raw_bytes: bool = False,
    width: int = TABLE_WIDTH,
) -> None:
    """Print data on stdout as a table (human sizes unless ``raw_bytes``, fits ``width`` columns),
    JSON or CSV (numbers as plain decimals, raw byte counts)."""
    if fmt == "json":
        typer.echo(json.dumps(_plain(rows), indent=2, sort_keys=True, default=_json_default))
        return
    items = [rows] if isinstance(rows, dict) else list(rows)
    cols = list(columns or (items[0].keys() if items else []))
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(cols)
        for r in items:
            w.writerow([_cell(r.get(c), column=c) for c in cols])
        sys.stdout.write(buf.getvalue())
        return
    if fmt != "table":
        err(f"unknown format {fmt!r} (table, json, csv)")
        raise typer.Exit(EXIT_USAGE)
    cells = [[_cell(r.get(c), column=c, raw_bytes=raw_bytes, table=True) for c in cols] for r in items]
    heads = [c.removesuffix("_bytes").upper() if not raw_bytes and _is_bytes_column(c) else c.upper() for c in cols]
    widths = _fit([max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(heads)], width)
    right = [_is_bytes_column(c) for c in cols]

    def line(values: list[str]) -> str:
        out = [_shorten(v, w).rjust(w) if r else _shorten(v, w).ljust(w) for v, w, r in zip(values, widths, right, strict=True)]
        return "  ".join(out).rstrip()

    typer.echo(line(heads))
    for row in cells:
        typer.echo(line(row))


def confirm(what: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        err(f"refusing to {what} without -y (no terminal to ask)")
        raise typer.Exit(EXIT_USAGE)
    if not typer.confirm(f"{what}?", err=True):
        raise typer.Exit(EXIT_ERROR)


Progress = Callable[[int], None]
