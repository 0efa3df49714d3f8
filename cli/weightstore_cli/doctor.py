"""``weightstore doctor``: check the CLI's target step by step and say what to fix.

One line per check, ``OK`` or ``FAIL`` (``WARN`` for what works but deserves a look) and, on
failure, what to do: the URL (scheme and host), the server (reachable, its version beside the
CLI's), the API key (set, accepted), its role, and the server's store and catalog (``/readyz``).
A check that cannot run because an earlier one failed is ``SKIP``. Exit 1 if any check failed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import typer

from weightstore_cli.common import DEFAULT_URL, KEY_FIX, KEY_OPTION, URL_OPTION, ConfigError, check_url

ROLES = ("reader", "trainer", "admin")


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # OK, WARN, FAIL, SKIP
    detail: str


def _cli_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("weightstore")
    except PackageNotFoundError:
        return "unknown"


def run_checks(url: str | None, api_key: str | None, role: str | None) -> list[Check]:
    """Every check, in order; later checks are skipped when what they need failed."""
    import httpx

    out: list[Check] = []
    raw = url or DEFAULT_URL
    try:
        base = check_url(raw)
    except ConfigError as exc:
        out.append(Check("url", "FAIL", str(exc)))
        return out + [Check(n, "SKIP", "needs a valid URL") for n in ("server", "key", "role", "store", "catalog")]
    out.append(Check("url", "OK", base + ("" if url else " (default; set WEIGHTSTORE_URL or pass --url)")))
    with httpx.Client(base_url=base, timeout=10) as http:
        try:
            r = http.get("/v1/version")
        except httpx.HTTPError as exc:
            out.append(
                Check("server", "FAIL", f"no weightstore server at {base} ({type(exc).__name__}); start `weightstore serve`")
            )
            return out + [Check(n, "SKIP", "needs the server") for n in ("key", "role", "store", "catalog")]
        if r.status_code != 200 or "version" not in _json(r):
            out.append(Check("server", "FAIL", f"{base} answered {r.status_code} to /v1/version: not a weightstore server?"))
            return out + [Check(n, "SKIP", "needs the server") for n in ("key", "role", "store", "catalog")]
        server_v, cli_v = str(_json(r)["version"]), _cli_version()
        same = server_v == cli_v
        out.append(
            Check(
                "server",
                "OK" if same else "WARN",
                f"weightstore {server_v}" + ("" if same else f" (this CLI is {cli_v}; upgrade the older one)"),
            )
        )
        out.extend(_key_checks(http, api_key, role))
        try:
            ready = http.get("/readyz")
            problems: dict[str, Any] = _json(ready).get("problems") or {}
        except httpx.HTTPError as exc:
            problems = {"object_store": type(exc).__name__, "catalog": type(exc).__name__}
        store = problems.get("object_store")
        catalog = problems.get("catalog")
        out.append(
            Check("store", "FAIL", f"the server cannot reach its object store ({store}); check its WEIGHTSTORE_S3_*")
            if store
            else Check("store", "OK", "the server reaches its object store")
        )
        out.append(
            Check("catalog", "FAIL", f"the server cannot reach its catalog ({catalog}); check its WEIGHTSTORE_DATABASE_URL")
            if catalog
            else Check("catalog", "OK", "the server reaches its catalog")
        )
    return out


def _json(r: Any) -> dict[str, Any]:
    try:
        body = r.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _key_checks(http: Any, api_key: str | None, role: str | None) -> list[Check]:
    if not api_key:
        return [Check("key", "FAIL", f"no API key: {KEY_FIX}"), Check("role", "SKIP", "needs a key")]
    r = http.get("/v1/whoami", headers={"X-API-Key": api_key})
    if r.status_code == 401:
        msg = _json(r).get("message") or "refused"
        return [Check("key", "FAIL", f"the server refused the key ({msg}); {KEY_FIX}"), Check("role", "SKIP", "needs a key")]
    if r.status_code != 200:
        return [Check("key", "FAIL", f"/v1/whoami answered {r.status_code}"), Check("role", "SKIP", "needs a key")]
    me = _json(r)
    out = [Check("key", "OK", f"key {me.get('key_id')} of tenant {me.get('tenant_id')}")]
    have = str(me.get("role"))
    if role is None:
        out.append(Check("role", "OK", have))
    elif have in ROLES and ROLES.index(have) >= ROLES.index(role):
        out.append(Check("role", "OK", f"{have} (needed: {role})"))
    else:
        out.append(Check("role", "FAIL", f"{have}, but {role} is needed: use a {role} key ({KEY_FIX})"))
    return out


def doctor(
    url: str = URL_OPTION,
    api_key: str = KEY_OPTION,
    role: str = typer.Option(None, "--role", help="Fail unless the key has at least this role: reader, trainer or admin."),
) -> None:
    """Check the URL, the server and its version, the API key and its role, and the server's store
    and catalog; one line per check with what to do. Exit 1 if any check failed."""
    if role is not None and role not in ROLES:
        typer.echo(f"error: --role must be one of {', '.join(ROLES)}", err=True)
        raise typer.Exit(2)
    checks = run_checks(url, api_key, role)
    for c in checks:
        typer.echo(f"{c.status:<4}  {c.name:<8} {c.detail}")
    if any(c.status == "FAIL" for c in checks):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
