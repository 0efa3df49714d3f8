"""Admin web UI at ``/admin``: server-rendered (Jinja2), no JavaScript, no CDN, charts as inline SVG.

Sign-in takes an admin API key in a POST form (never in a URL, never logged) and starts a
server-side session (``weightstore.uisessions``): the cookie carries only a random session id, every
page checks the session row (not ended, not expired or idle, its key still an unrevoked admin key),
and sign-out or the key's revocation ends it for every copy of the cookie. Every state-changing POST
(sign-in, sign-out) must be same-origin (``Origin``, else ``Referer``, against the request's own host
or ``public_url``) and carry a CSRF token: the session's, or before sign-in one tied to a
double-submit cookie. Cookies are HttpOnly, SameSite=Strict and Secure on https. Every number comes
from ``weightstore.billing`` (SQL aggregates over the ledger), so pages stay fast on large catalogs.

Tenant management (issue 12, parts 1-3): the tenants page, the per-tenant manage and delete-confirm
pages and the Trash card's Restore buttons post forms guarded like sign-out (``_checked_post``) and
call the core (``weightstore.tenants``, ``weightstore.retention``), never the HTTP API. Success is
post/redirect/get with a message signed for the session (``_done``); a refusal rolls the request's
transaction back and shows the page again with the core's message and the error table's status.
The tenant page is assembled from view helpers (``_usage_view``, ``_quota_view``, ``_trash_view``,
``_invoice_months``) that return small view models.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode, urlsplit

import sqlalchemy as sa
from fastapi import APIRouter, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape
from sqlmodel import Session, col, select

from weightstore import auth, bootstrap, retention, uisessions
from weightstore import tenants as tenants_core
from weightstore.auth import Principal
from weightstore.billing import catalog, invoices, usage
from weightstore.billing.overview import overview as all_tenants_overview
from weightstore.billing.pricing import load_pricing
from weightstore.billing.units import DAY, GB, day_window
from weightstore.context import Context
from weightstore.errors import AuthenticationFailed, Forbidden, InvalidRequest, NotFound, WeightstoreError
from weightstore.models import ApiKey, AuditEvent, Checkpoint, CheckpointState, Role, Tenant, TenantState
from weightstore.names import TinkerPath

from ..deps import CtxDep, SessionDep
from ..errors import status_for
from .billing import checkpoints_csv, invoice_csv

HERE = Path(__file__).resolve().parent.parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
router = APIRouter(prefix="/admin", include_in_schema=False)

COOKIE = "ws_admin"
SIGN_IN_COOKIE = "ws_admin_signin"
"""Double-submit cookie of the sign-in form: a random nonce the form's CSRF token is tied to."""
SIGN_IN_COOKIE_MAX_AGE = 3600
DEFAULT_PORTS = {"http": 80, "https": 443}
TREND_DAYS = 14
WINDOWS = (7, 30, 90, 365)


class NotSignedIn(Exception):
    """Raised by pages when the session cookie is missing, invalid, expired or its key revoked."""


class PageError(Exception):
    """A page's refusal (unknown tenant, bad window or month): an HTML error page, not the JSON body;
    the status still comes from the one error table."""

    def __init__(self, error: WeightstoreError) -> None:
        super().__init__(str(error))
        self.error = error


def human_bytes(n: float) -> str:
    """Decimal units chosen per scale (B, kB, MB, GB, TB, PB), three significant digits: 0.2 GB reads
    "200 MB", never "0.00 GB"."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 999.5:  # would round to "1e+03" at three digits: the next unit reads "1"
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1000
    return f"{value:,.0f} PB" if abs(value) >= 100 else f"{value:.3g} PB"


def install(app: FastAPI) -> None:
    app.mount("/admin/static", StaticFiles(directory=str(HERE / "static")), name="admin-static")

    @app.exception_handler(NotSignedIn)
    async def _to_login(request: Request, exc: NotSignedIn) -> Response:
        return RedirectResponse("/admin/login", status_code=303)

    @app.exception_handler(PageError)
    async def _error_page(request: Request, exc: PageError) -> Response:
        status = status_for(exc.error)
        return _render(request, "error.html", status=status, status_code=status, error=str(exc.error))

    @app.exception_handler(CrossSiteRefused)
    async def _cross_site(request: Request, exc: CrossSiteRefused) -> Response:
        return _refused(request, CROSS_SITE)


templates.env.filters["bytes"] = human_bytes


def _admin_key_id(request: Request, ctx: Context, session: Session) -> str:
    """The key id of the signed-in admin session (checked on the server, see ``uisessions.check``);
    also leaves the session's CSRF token for ``_render`` to put in the page's forms."""
    session_id = request.cookies.get(COOKIE)
    idle = timedelta(seconds=ctx.settings.admin_session_idle_seconds)
    try:
        row = uisessions.check(session, session_id, now=ctx.clock.now(), idle=idle)
    except AuthenticationFailed:
        raise NotSignedIn() from None
    assert session_id is not None  # check() refuses a missing id
    secret = bootstrap.session_secret(ctx.settings)
    request.state.csrf_token = uisessions.csrf_token(secret, uisessions.SESSION_FORM, session_id)
    return row.key_id


def _same_origin(request: Request, ctx: Context) -> bool:
    """Does this POST come from a page of this service? ``Origin`` (or, when a browser sends none,
    ``Referer``) must name the request's own host and port, or those of ``public_url`` (a proxy that
    rewrites ``Host``). A missing, ``null`` or unparsable source fails: browsers send ``Origin`` on
    every form POST, and the UI is for browsers."""
    source = request.headers.get("origin") or request.headers.get("referer")
    try:
        src = urlsplit(source or "")
        if src.scheme not in DEFAULT_PORTS or not src.hostname:
            return False
        wanted = (src.hostname, src.port or DEFAULT_PORTS[src.scheme])
        allowed = set()
        host = request.headers.get("host")
        if host:
            own = urlsplit(f"//{host}")
            allowed.add((own.hostname, own.port or DEFAULT_PORTS[src.scheme]))
        if ctx.settings.public_url:
            pub = urlsplit(ctx.settings.public_url)
            allowed.add((pub.hostname, pub.port or DEFAULT_PORTS.get(pub.scheme, 0)))
    except ValueError:  # a malformed port
        return False
    return wanted in allowed


def _set_cookie(response: Response, request: Request, ctx: Context, name: str, value: str, *, max_age: int, path: str) -> None:
    """HttpOnly (no script reads it), SameSite=Strict (never sent on a request another site starts:
    the UI has no cross-site entry point worth a session, and Strict keeps sessions out of every
    cross-site navigation, not only POSTs) and Secure when configured or the request is https."""
    secure = ctx.settings.cookie_secure or request.url.scheme == "https"
    response.set_cookie(name, value, max_age=max_age, httponly=True, samesite="strict", secure=secure, path=path)


def _refused(request: Request, why: str) -> HTMLResponse:
    """A refused cross-site or token-less POST: the status comes from the error table (403)."""
    return _render(request, "refused.html", status=status_for(Forbidden(why)), error=why)


CROSS_SITE = "This request did not come from this site's own form (Origin or CSRF check failed). Reload the page and try again."


def _render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    context.setdefault("csrf_token", getattr(request.state, "csrf_token", ""))
    resp = templates.TemplateResponse(request, name, context, status_code=status)
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["Content-Security-Policy"] = "default-src 'self'; style-src 'self'; img-src 'self' data:; form-action 'self'"
    resp.headers["X-Frame-Options"] = "DENY"
    return resp


# --- sign in / out ------------------------------------------------------------------------------
def _sign_in_form(request: Request, ctx: Context, status: int = 200, error: str | None = None) -> HTMLResponse:
    """The sign-in form with its CSRF token, tied to the (re)issued double-submit cookie's nonce.
    An existing nonce is kept, so two open sign-in tabs both work."""
    nonce = request.cookies.get(SIGN_IN_COOKIE) or ""
    if not 20 <= len(nonce) <= uisessions.MAX_ID_LENGTH:
        nonce = uisessions.new_nonce()
    token = uisessions.csrf_token(bootstrap.session_secret(ctx.settings), uisessions.SIGN_IN_FORM, nonce)
    resp = _render(request, "login.html", status=status, error=error, csrf_token=token)
    _set_cookie(resp, request, ctx, SIGN_IN_COOKIE, nonce, max_age=SIGN_IN_COOKIE_MAX_AGE, path="/admin/login")
    return resp


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, ctx: CtxDep) -> HTMLResponse:
    return _sign_in_form(request, ctx)


SIGN_IN_REFUSALS: dict[type[WeightstoreError], str] = {
    AuthenticationFailed: "That key is not valid.",  # unknown, malformed or revoked: not told apart
    Forbidden: "This is not an admin key: the admin UI needs one.",
}
"""What the sign-in form says for each error it may meet; the status comes from the error table."""


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    ctx: CtxDep,
    session: SessionDep,
    api_key: Annotated[str, Form(max_length=200)] = "",
    csrf_token: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    """Sign in with an admin key: a same-origin POST carrying the form's CSRF token, else 403 and
    nothing is checked. A refused key gets the form again, with the status the one error table
    gives its error (an HTML page, not the JSON error body: a browser shows this)."""
    secret = bootstrap.session_secret(ctx.settings)
    nonce = request.cookies.get(SIGN_IN_COOKIE)
    if not _same_origin(request, ctx) or not uisessions.csrf_ok(secret, uisessions.SIGN_IN_FORM, nonce, csrf_token):
        return _refused(request, CROSS_SITE)
    now = ctx.clock.now()
    try:
        principal = auth.authenticate(session, api_key.strip(), now=now)
        principal.require_admin()
    except (AuthenticationFailed, Forbidden) as exc:
        message = next(text for cls, text in SIGN_IN_REFUSALS.items() if isinstance(exc, cls))
        return _sign_in_form(request, ctx, status=status_for(exc), error=message)
    uisessions.end(session, request.cookies.get(COOKIE), now=now)  # a session this browser had before
    lifetime = ctx.settings.admin_session_lifetime_seconds
    session_id = uisessions.start(session, key_id=principal.key_id, now=now, lifetime=timedelta(seconds=lifetime))
    resp = RedirectResponse("/admin", status_code=303)
    _set_cookie(resp, request, ctx, COOKIE, session_id, max_age=lifetime, path="/admin")
    resp.delete_cookie(SIGN_IN_COOKIE, path="/admin/login", httponly=True, samesite="strict")
    return resp


@router.post("/logout")
def logout(request: Request, ctx: CtxDep, session: SessionDep, csrf_token: Annotated[str, Form(max_length=200)] = "") -> Response:
    """Sign out: end the session on the server, so every copy of the cookie stops working. Needs a
    same-origin POST and the session's CSRF token (else 403 and the session stays as it was)."""
    if not _same_origin(request, ctx):
        return _refused(request, CROSS_SITE)
    session_id = request.cookies.get(COOKIE)
    if session_id is not None:
        secret = bootstrap.session_secret(ctx.settings)
        if not uisessions.csrf_ok(secret, uisessions.SESSION_FORM, session_id, csrf_token):
            return _refused(request, CROSS_SITE)
        uisessions.end(session, session_id, now=ctx.clock.now())
    resp = RedirectResponse("/admin/login", status_code=303)
    resp.delete_cookie(COOKIE, path="/admin", httponly=True, samesite="strict")
    return resp


# --- charts -------------------------------------------------------------------------------------
def _fmt_money(x: Decimal | float) -> str:
    return f"${Decimal(str(x)):,.2f}"


def _axis_money(x: float) -> str:
    """An axis label that reads true at any scale: cents from $1, else three significant digits."""
    return _fmt_money(x) if x >= 1 else f"${x:.3g}"


def sparkline(values: list[float], width: int = 120, height: int = 28) -> Markup:
    if not values:
        return Markup("")
    top = max(values) or 1.0
    step = width / max(1, len(values) - 1)
    pts = " ".join(f"{i * step:.1f},{height - 2 - (v / top) * (height - 4):.1f}" for i, v in enumerate(values))
    return Markup(
        f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="trend"><polyline fill="none" stroke="currentColor" stroke-width="1.5" points="{pts}"/></svg>'
    )


def daily_chart(points: list[dict[str, Any]], width: int = 760, height: int = 240) -> Markup:
    """Bars: cost per day (left axis); line: average GB stored that day (right axis)."""
    if not points:
        return Markup("<p>No data in this window.</p>")
    pad_l, pad_r, pad_t, pad_b = 56, 56, 16, 36
    w, h = width - pad_l - pad_r, height - pad_t - pad_b
    costs = [float(p["cost_usd"]) for p in points]
    gbs = [float(p["average_gb"]) for p in points]
    cmax, gmax = max(costs) or 0.01, max(gbs) or 1.0
    n = len(points)
    bw = w / n
    parts = [
        f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="stored GB and cost per day">'
    ]
    parts.append(f'<line x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}" class="axis"/>')
    for i, (p, c) in enumerate(zip(points, costs, strict=True)):
        bh = c / cmax * h
        x = pad_l + i * bw
        parts.append(
            f'<rect class="bar" x="{x + bw * 0.1:.1f}" y="{pad_t + h - bh:.1f}" width="{bw * 0.8:.1f}" '
            f'height="{bh:.1f}"><title>{escape(p["bucket"])}: {_fmt_money(c)}, '
            f"{human_bytes(p['average_gb'] * GB)}</title></rect>"
        )
    pts = " ".join(f"{pad_l + (i + 0.5) * bw:.1f},{pad_t + h - g / gmax * h:.1f}" for i, g in enumerate(gbs))
    parts.append(f'<polyline class="line" fill="none" points="{pts}"/>')
    parts.append(f'<text x="{pad_l - 6}" y="{pad_t + 10}" text-anchor="end" class="lbl cost">{_axis_money(cmax)}</text>')
    parts.append(f'<text x="{pad_l - 6}" y="{pad_t + h}" text-anchor="end" class="lbl cost">$0</text>')
    parts.append(f'<text x="{pad_l + w + 6}" y="{pad_t + 10}" class="lbl gb" id="axis-gb-max">{human_bytes(gmax * GB)}</text>')
    parts.append(f'<text x="{pad_l + w + 6}" y="{pad_t + h}" class="lbl gb">0</text>')
    for i in sorted({0, n // 2, n - 1}):
        parts.append(
            f'<text x="{pad_l + (i + 0.5) * bw:.1f}" y="{pad_t + h + 18}" text-anchor="middle" '
            f'class="lbl">{escape(points[i]["bucket"])}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))


# --- pages --------------------------------------------------------------------------------------
def _day_floor(dt: datetime) -> datetime:
    return datetime(dt.year, dt.month, dt.day, tzinfo=UTC)


@router.get("", response_class=HTMLResponse)
def overview(request: Request, ctx: CtxDep, session: SessionDep) -> HTMLResponse:
    """Billed tenants (active and disabled: both still store and are billed); deleted tenants only in
    their own "Deleted tenants · final invoices" table, never among the active ones (issue 12, part 2)."""
    now = ctx.clock.now()
    _admin_key_id(request, ctx, session)
    prices = load_pricing(session, ctx.settings)
    # operator tenants are not billed (issue 12, part 1); deleted ones are listed apart (part 2)
    billed = [t for t in tenants_core.list_tenants(session) if not t.operator]
    state = {t.id: t.state for t in billed}
    deleted = {t.id for t in billed if t.state == TenantState.deleted}
    end = _day_floor(now) + timedelta(days=1)
    start = end - timedelta(days=TREND_DAYS)
    # one pass over the intervals: current usage + daily buckets up to now (never bill the future:
    # open-ended checkpoints accrue until now, not until the bucket's end)
    ov = all_tenants_overview(session, prices, now=now, start=start)
    cur = {r.key["tenant_id"]: r for r in ov.current}
    daily = ov.daily
    physical = catalog.physical_current(session, now=now)
    by_tenant: dict[str, list[usage.UsageRow]] = {}
    for r in daily:
        by_tenant.setdefault(r.key["tenant_id"], []).append(r)
    rows = []
    for tid in sorted((set(state) | set(cur)) - deleted):
        c = cur.get(tid)
        pts = usage.series(by_tenant.get(tid, []), start=start, end=now)
        gb = [p["average_gb"] for p in pts]
        first, last = sum(gb[: len(gb) // 2]), sum(gb[len(gb) // 2 :])
        trend = None if first == 0 else (last - first) / first * 100
        logical = c.logical_bytes if c else 0
        rows.append(
            {
                "tenant": tid,
                "state": state.get(tid, TenantState.active.value),
                "checkpoints": c.checkpoint_count if c else 0,
                "gb": logical / GB,
                "physical_gb": physical.get(tid, 0) / GB,
                "monthly": _fmt_money(c.monthly_cost_usd if c else 0),
                "trend": trend,
                "spark": sparkline(gb),
            }
        )
    total_monthly = sum((r.monthly_cost_usd for tid, r in cur.items() if tid not in deleted), Decimal("0.00"))
    return _render(
        request,
        "overview.html",
        rows=rows,
        deleted=_deleted_tenants_view(session, sorted(deleted)),
        now=now,
        total_monthly=_fmt_money(total_monthly),
        total_gb=sum(r["gb"] for r in rows),
        trend_days=TREND_DAYS,
    )


@dataclass(frozen=True)
class DeletedTenantView:
    """A deleted tenant on the overview: where its final invoice is."""

    tenant: str
    deleted_at: datetime | None
    """From the ``tenant.delete`` audit event (None if the audit log has none)."""
    final_month: str | None
    """``YYYY-MM`` of the deletion: the month whose invoice is its last one."""


def _deleted_tenants_view(session: Session, tenant_ids: list[str]) -> list[DeletedTenantView]:
    if not tenant_ids:
        return []
    q = (
        select(col(AuditEvent.target), sa.func.max(col(AuditEvent.at)))
        .where(col(AuditEvent.action) == "tenant.delete", col(AuditEvent.target).in_(tenant_ids))
        .group_by(col(AuditEvent.target))
    )
    when: dict[str, datetime] = {str(t): at for t, at in session.exec(q).all()}
    out = []
    for tid in tenant_ids:
        at = when.get(tid)
        at = at.replace(tzinfo=UTC) if at is not None and at.tzinfo is None else at  # SQLite drops the zone
        out.append(DeletedTenantView(tid, at, None if at is None else f"{at.year:04d}-{at.month:02d}"))
    return out


def _tenant_or_404(session: Session, tenant_id: str) -> Tenant:
    t = session.get(Tenant, tenant_id)
    if t is None:
        raise PageError(NotFound(f"tenant {tenant_id} not found"))
    return t


def _parse_day(value: str | None) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise PageError(InvalidRequest(f"not a date: {value[:40]!r} (YYYY-MM-DD)")) from None


# --- tenant page: view models -------------------------------------------------------------------
@dataclass(frozen=True)
class BreakdownRow:
    """One row of the "By run" / "By kind" tables."""

    name: str
    gb_hours: float
    cost: str
    current_gb: float
    count: int
    monthly: str


@dataclass(frozen=True)
class UsageView:
    """The tenant page's chart, window summary, breakdowns and stored-now figures."""

    chart: Markup
    points: list[dict[str, Any]]
    window_cost: str
    window_gb_hours: float
    runs: list[BreakdownRow]
    kinds: list[BreakdownRow]
    logical_bytes: int
    physical_bytes: int
    monthly: str
    rate: Decimal

    @property
    def saving_bytes(self) -> int:
        return max(0, self.logical_bytes - self.physical_bytes)

    @property
    def saving_pct(self) -> float:
        return 100 * self.saving_bytes / self.logical_bytes if self.logical_bytes else 0.0


@dataclass(frozen=True)
class QuotaView:
    """The tenant page's quota line (issue 12, part 2): used logical bytes against the soft and hard quota."""

    state: str
    used_bytes: int
    soft_bytes: int | None
    hard_bytes: int | None

    @property
    def over_soft(self) -> bool:
        return self.soft_bytes is not None and self.used_bytes >= self.soft_bytes

    @property
    def pct(self) -> float | None:
        return None if not self.hard_bytes else 100 * self.used_bytes / self.hard_bytes


@dataclass(frozen=True)
class TrashRow:
    """A trash entry with the TTL its Restore form proposes (the tenant's default for its kind)."""

    entry: retention.TrashEntry
    default_ttl: int | None


def _breakdown(rows: list[usage.UsageRow], cur: dict[str, usage.CurrentRow], key: str) -> list[BreakdownRow]:
    out = []
    for name in sorted({r.key[key] for r in rows} | set(cur)):
        u = next((r for r in rows if r.key[key] == name), None)
        c = cur.get(name)
        out.append(
            BreakdownRow(
                name=name,
                gb_hours=float(u.gb_hours) if u else 0.0,
                cost=_fmt_money(u.cost_usd if u else 0),
                current_gb=(c.logical_bytes if c else 0) / GB,
                count=c.checkpoint_count if c else 0,
                monthly=_fmt_money(c.monthly_cost_usd if c else 0),
            )
        )
    return out


def _usage_view(session: Session, ctx: Context, tenant: Tenant, *, start: datetime, end: datetime) -> UsageView:
    now = ctx.clock.now()
    prices = load_pricing(session, ctx.settings)
    tid = tenant.id
    daily = usage.usage(session, prices, start=start, end=end, group_by=(), bucket_seconds=DAY, tenant_id=tid)
    by_run = usage.usage(session, prices, start=start, end=end, group_by=("run_id",), tenant_id=tid)
    by_kind = usage.usage(session, prices, start=start, end=end, group_by=("kind",), tenant_id=tid)
    cur_run = {r.key["run_id"]: r for r in usage.current(session, prices, now=now, group_by=("run_id",), tenant_id=tid)}
    cur_kind = {r.key["kind"]: r for r in usage.current(session, prices, now=now, group_by=("kind",), tenant_id=tid)}
    points = usage.series(daily, start=start, end=end)
    return UsageView(
        chart=daily_chart(points),
        points=points,
        window_cost=_fmt_money(sum((Decimal(p["cost_usd"]) for p in points), Decimal("0.00"))),
        window_gb_hours=sum(p["gb_hours"] for p in points),
        runs=_breakdown(by_run, cur_run, "run_id"),
        kinds=_breakdown(by_kind, cur_kind, "kind"),
        logical_bytes=sum(r.logical_bytes for r in cur_kind.values()),
        physical_bytes=catalog.physical_current(session, now=now, tenant_id=tid).get(tid, 0),
        monthly=_fmt_money(sum((c.monthly_cost_usd for c in cur_kind.values()), Decimal("0.00"))),
        rate=prices.rate(tid, None),
    )


def _quota_view(session: Session, tenant: Tenant, now: datetime) -> QuotaView:
    used = tenants_core.usage(session, tenant.id, now=now).used_bytes
    return QuotaView(tenant.state, used, tenant.soft_quota_bytes, tenant.quota_bytes)


def _trash_view(session: Session, ctx: Context, tenant: Tenant) -> list[TrashRow]:
    entries = retention.trash_of(session, tenant.id, now=ctx.clock.now(), settings=ctx.settings)
    defaults = {kind: retention.tenant_default_ttl(session, tenant.id, kind) for kind in {e.kind for e in entries}}
    return [TrashRow(e, defaults[e.kind]) for e in entries]


def _invoice_months(start: datetime, end: datetime) -> list[str]:
    """``YYYY-MM`` of every month the window touches, newest first (links to the invoice pages)."""
    months = []
    m = date(start.year, start.month, 1)
    while m <= end.date():
        months.append(f"{m.year:04d}-{m.month:02d}")
        m = date(m.year + (m.month == 12), m.month % 12 + 1, 1)
    return list(reversed(months))


@router.get("/tenants/{tenant_id}", response_class=HTMLResponse)
def tenant_page(
    request: Request,
    tenant_id: str,
    ctx: CtxDep,
    session: SessionDep,
    days: int = 30,
    since: str | None = None,
    until: str | None = None,
) -> HTMLResponse:
    _admin_key_id(request, ctx, session)
    return _tenant_page(request, ctx, session, tenant_id, days=days, since=since, until=until)


def _tenant_page(
    request: Request,
    ctx: Context,
    session: Session,
    tenant_id: str,
    *,
    days: int = 30,
    since: str | None = None,
    until: str | None = None,
    status: int = 200,
    action_error: str | None = None,
) -> HTMLResponse:
    """The tenant page (the caller checked the session); ``action_error`` is a refused Restore."""
    now = ctx.clock.now()
    # the one window rule (weightstore.billing.units): until cut at today, since at 1970, refusals 400
    try:
        start, shown_end, end = day_window(_parse_day(since), _parse_day(until), now=now, days=days)
    except InvalidRequest as exc:
        raise PageError(exc) from None
    tenant = _tenant_or_404(session, tenant_id)
    return _render(
        request,
        "tenant.html",
        status=status,
        tenant=tenant.id,
        now=now,
        start=start.date(),
        end=(shown_end - timedelta(days=1)).date(),
        windows=WINDOWS,
        days=(shown_end - start).days,
        u=_usage_view(session, ctx, tenant, start=start, end=end),
        largest=catalog.largest_checkpoints(session, tenant_id=tenant.id, now=now),
        expiring=catalog.expiring_soon(session, tenant_id=tenant.id, now=now),
        trash=_trash_view(session, ctx, tenant),
        quota=_quota_view(session, tenant, now),
        months=_invoice_months(start, end),
        flash=_flash_of(request, ctx),
        action_error=action_error,
    )


def _load_invoice(request: Request, ctx: Context, session: Session, tenant_id: str, month: str) -> tuple[str, Any]:
    """Signed-in admin check, tenant look-up and the month's invoice (shared by page and CSV)."""
    _admin_key_id(request, ctx, session)
    tenant = _tenant_or_404(session, tenant_id)
    prices = load_pricing(session, ctx.settings)
    try:
        inv = invoices.invoice(session, prices, tenant_id=tenant.id, month=month, now=ctx.clock.now())
    except InvalidRequest as exc:
        raise PageError(exc) from None
    return tenant.id, inv


@router.get("/tenants/{tenant_id}/invoices/{month}", response_class=HTMLResponse)
def invoice_page(request: Request, tenant_id: str, month: str, ctx: CtxDep, session: SessionDep) -> HTMLResponse:
    tenant, inv = _load_invoice(request, ctx, session, tenant_id, month)
    return _render(request, "invoice.html", inv=inv, tenant=tenant, by_kind=inv.by_kind(), month=month)


@router.get("/tenants/{tenant_id}/invoices/{month}/csv")
def invoice_download(request: Request, tenant_id: str, month: str, ctx: CtxDep, session: SessionDep) -> Response:
    return invoice_csv(_load_invoice(request, ctx, session, tenant_id, month)[1])


@router.get("/tenants/{tenant_id}/invoices/{month}/checkpoints.csv")
def invoice_checkpoints_download(request: Request, tenant_id: str, month: str, ctx: CtxDep, session: SessionDep) -> Response:
    return checkpoints_csv(_load_invoice(request, ctx, session, tenant_id, month)[1])


# --- tenant management (issue 12, part 1): forms calling weightstore.tenants -----------------------
FLASH = "admin-flash"
"""HMAC purpose of the message a successful POST carries to the page it redirects to."""
SIZE_UNITS: dict[str, int] = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "pb": 10**15,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "pib": 2**50,
}
"""Units the quota fields accept (case-insensitive); GB = 10^9 bytes as everywhere in billing."""
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")


class CrossSiteRefused(Exception):
    """A state-changing POST that failed the Origin or CSRF check: the "Refused" page, 403."""


def _checked_post(request: Request, ctx: Context, session: Session, csrf_token: str) -> Principal:
    """The guard of every management POST, as for sign-out: same origin (else refused, nothing
    checked), a live admin session (else the sign-in page), the session's CSRF token (else
    refused). Returns the signed-in admin key as the ``Principal`` the core functions audit."""
    if not _same_origin(request, ctx):
        raise CrossSiteRefused()
    key_id = _admin_key_id(request, ctx, session)
    secret = bootstrap.session_secret(ctx.settings)
    if not uisessions.csrf_ok(secret, uisessions.SESSION_FORM, request.cookies.get(COOKIE), csrf_token):
        raise CrossSiteRefused()
    key = session.get(ApiKey, key_id)
    assert key is not None  # uisessions.check found the key unrevoked
    return Principal(tenant_id=key.tenant_id, key_id=key.id, role=Role(key.role))


def _flash_sig(request: Request, ctx: Context, message: str) -> str:
    bound = f"{request.cookies.get(COOKIE) or ''}\0{message}"
    return uisessions.csrf_token(bootstrap.session_secret(ctx.settings), FLASH, bound)


def _done(request: Request, ctx: Context, url: str, message: str) -> RedirectResponse:
    """Post/redirect/get: the page at ``url`` shows ``message``, signed for this session so that a
    link from elsewhere cannot make the UI claim something happened."""
    query = urlencode({"flash": message, "sig": _flash_sig(request, ctx, message)})
    return RedirectResponse(f"{url}?{query}", status_code=303)


def _flash_of(request: Request, ctx: Context) -> str | None:
    message, sig = request.query_params.get("flash"), request.query_params.get("sig")
    if not message or not sig or len(message) > 1000:
        return None
    return message if hmac.compare_digest(_flash_sig(request, ctx, message), sig) else None


def _refusal(session: Session, exc: WeightstoreError) -> tuple[int, str]:
    """A refused action: undo whatever the core function flushed before refusing (the request's
    transaction would otherwise commit it), and the status (error table) and message to show."""
    session.rollback()
    return status_for(exc), str(exc)


def parse_size(field: str, value: str) -> int | None:
    """A quota field: empty → none; ``500000000000``, ``500 GB``, ``0.5TB``, ``2 TiB`` → bytes."""
    text = value.strip()
    if not text:
        return None
    m = _SIZE.fullmatch(text)
    mult = SIZE_UNITS.get((m[2] or "b").lower()) if m else None
    if m is None or mult is None:
        raise InvalidRequest(f"{field}: {value[:40]!r} is not a size (e.g. 500 GB, 2 TiB or a number of bytes; empty for none)")
    n = Decimal(m[1]) * mult
    if n != n.to_integral_value():
        raise InvalidRequest(f"{field}: {value[:40]!r} is not a whole number of bytes")
    return int(n)


def parse_price(value: str) -> float | None:
    """The price field: empty → no override (the default rate applies); else USD per GB-month."""
    text = value.strip().removeprefix("$").strip()
    if not text:
        return None
    try:
        price = Decimal(text)
    except InvalidOperation:
        price = Decimal("NaN")
    if not price.is_finite():
        raise InvalidRequest(f"price: {value[:40]!r} is not a price in USD per GB-month (e.g. 0.021; empty for the default rate)")
    return float(price)


def parse_ttl(value: str) -> int | None:
    """The restore TTL field: empty → no expiry; else whole seconds (checked by ``retention.check_ttl``)."""
    text = value.strip()
    if not text:
        return None
    if not text.isdigit():
        raise InvalidRequest(f"TTL: {value[:40]!r} is not a whole number of seconds (empty for no expiry)")
    return int(text)


def size_text(n: int | None) -> str:
    """A quota as the form shows it: exact, in the largest decimal unit that divides it."""
    if n is None:
        return ""
    for unit, mult in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n and n % mult == 0:
            return f"{n // mult} {unit}"
    return str(n)


@dataclass(frozen=True)
class TenantRow:
    """A row of the tenants page."""

    tenant: Tenant
    rate: Decimal
    """The rate it is billed at: its override, else the default."""
    quota: QuotaView


def _tenant_rows(session: Session, ctx: Context) -> list[TenantRow]:
    now = ctx.clock.now()
    prices = load_pricing(session, ctx.settings)
    used = tenants_core.usage_all(session, now=now)
    rows = []
    for t in tenants_core.list_tenants(session):
        u = used.get(t.id, tenants_core.TenantUsage(0, 0)).used_bytes
        rows.append(TenantRow(t, prices.rate(t.id, None), QuotaView(t.state, u, t.soft_quota_bytes, t.quota_bytes)))
    # active and disabled first, deleted ones last: they are kept only for their invoices
    return sorted(rows, key=lambda r: (r.tenant.state == TenantState.deleted, r.tenant.id))


def _tenants_page(
    request: Request,
    ctx: Context,
    session: Session,
    *,
    status: int = 200,
    error: str | None = None,
    form: dict[str, str] | None = None,
) -> HTMLResponse:
    return _render(
        request,
        "tenants.html",
        status=status,
        rows=_tenant_rows(session, ctx),
        default_rate=load_pricing(session, ctx.settings).rate(None, None),
        flash=_flash_of(request, ctx),
        action_error=error,
        form=form or {},
    )


@router.get("/tenants", response_class=HTMLResponse)
def tenants_page(request: Request, ctx: CtxDep, session: SessionDep) -> HTMLResponse:
    _admin_key_id(request, ctx, session)
    return _tenants_page(request, ctx, session)


@router.post("/tenants", response_class=HTMLResponse)
def create_tenant(
    request: Request,
    ctx: CtxDep,
    session: SessionDep,
    name: Annotated[str, Form(max_length=200)] = "",
    price: Annotated[str, Form(max_length=200)] = "",
    quota: Annotated[str, Form(max_length=200)] = "",
    soft_quota: Annotated[str, Form(max_length=200)] = "",
    csrf_token: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    principal = _checked_post(request, ctx, session, csrf_token)
    try:
        t = tenants_core.create(
            session,
            name.strip(),
            now=ctx.clock.now(),
            principal=principal,
            price_per_gb_month_usd=parse_price(price),
            quota_bytes=parse_size("hard quota", quota),
            soft_quota_bytes=parse_size("soft quota", soft_quota),
        )
    except WeightstoreError as exc:
        status, message = _refusal(session, exc)
        form = {"name": name, "price": price, "quota": quota, "soft_quota": soft_quota}
        return _tenants_page(request, ctx, session, status=status, error=message, form=form)
    return _done(request, ctx, "/admin/tenants", f"Tenant {t.id} created.")


def _manage_page(
    request: Request, ctx: Context, session: Session, tenant: Tenant, *, status: int = 200, error: str | None = None
) -> HTMLResponse:
    now = ctx.clock.now()
    return _render(
        request,
        "tenant_manage.html",
        status=status,
        t=tenant,
        quota=_quota_view(session, tenant, now),
        rate=load_pricing(session, ctx.settings).rate(tenant.id, None),
        default_rate=load_pricing(session, ctx.settings).rate(None, None),
        quota_text=size_text(tenant.quota_bytes),
        soft_text=size_text(tenant.soft_quota_bytes),
        flash=_flash_of(request, ctx),
        action_error=error,
    )


@router.get("/tenants/{tenant_id}/manage", response_class=HTMLResponse)
def manage_page(request: Request, tenant_id: str, ctx: CtxDep, session: SessionDep) -> HTMLResponse:
    _admin_key_id(request, ctx, session)
    return _manage_page(request, ctx, session, _tenant_or_404(session, tenant_id))


def _manage_action(
    request: Request,
    ctx: Context,
    session: Session,
    tenant_id: str,
    csrf_token: str,
    act: Callable[[Principal, Tenant], str],
) -> Response:
    """The shape every form of the manage page shares: the post is checked (origin, session, CSRF),
    the tenant looked up, ``act`` run; its refusal is shown on the page with the error table's status
    and nothing it flushed is kept, its success message is flashed after a redirect."""
    principal = _checked_post(request, ctx, session, csrf_token)
    tenant = _tenant_or_404(session, tenant_id)
    try:
        done = act(principal, tenant)
    except WeightstoreError as exc:
        status, message = _refusal(session, exc)
        return _manage_page(request, ctx, session, _tenant_or_404(session, tenant_id), status=status, error=message)
    return _done(request, ctx, f"/admin/tenants/{tenant.id}/manage", done)


@router.post("/tenants/{tenant_id}/settings", response_class=HTMLResponse)
def update_tenant(
    request: Request,
    tenant_id: str,
    ctx: CtxDep,
    session: SessionDep,
    price: Annotated[str, Form(max_length=200)] = "",
    quota: Annotated[str, Form(max_length=200)] = "",
    soft_quota: Annotated[str, Form(max_length=200)] = "",
    name: Annotated[str, Form(max_length=200)] = "",
    csrf_token: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    """Set the display name, the price override and both quotas from the form; an empty price or quota
    clears it, an empty name keeps the current one (the tenant id never changes)."""

    def act(principal: Principal, tenant: Tenant) -> str:
        tenants_core.update(
            session,
            tenant.id,
            now=ctx.clock.now(),
            principal=principal,
            name=name.strip() or tenants_core.UNSET,
            price_per_gb_month_usd=parse_price(price),
            quota_bytes=parse_size("hard quota", quota),
            soft_quota_bytes=parse_size("soft quota", soft_quota),
        )
        return f"Tenant {tenant.id}: name, price and quotas saved."

    return _manage_action(request, ctx, session, tenant_id, csrf_token, act)


@router.post("/tenants/{tenant_id}/default-ttl", response_class=HTMLResponse)
def set_tenant_default_ttl(
    request: Request,
    tenant_id: str,
    ctx: CtxDep,
    session: SessionDep,
    training: Annotated[str, Form(max_length=40)] = "",
    sampler: Annotated[str, Form(max_length=40)] = "",
    csrf_token: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    """The TTLs a new checkpoint of this tenant gets when its save asks for none (the same rule as
    ``weightstore gc default-ttl``): whole seconds within the TTL bounds; an empty field, no default."""

    def act(_principal: Principal, tenant: Tenant) -> str:
        if tenant.state == TenantState.deleted:
            raise InvalidRequest(f"tenant {tenant.id} was deleted: it cannot be changed")
        training_s, sampler_s = parse_ttl(training), parse_ttl(sampler)
        retention.set_default_ttl(session, tenant.id, settings=ctx.settings, training=training_s or 0, sampler=sampler_s or 0)
        return f"Tenant {tenant.id}: default TTLs saved."

    return _manage_action(request, ctx, session, tenant_id, csrf_token, act)


@router.post("/tenants/{tenant_id}/state", response_class=HTMLResponse)
def set_tenant_state(
    request: Request,
    tenant_id: str,
    ctx: CtxDep,
    session: SessionDep,
    action: Annotated[str, Form(max_length=20)] = "",
    csrf_token: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    """Disable (every key of the tenant refused, ``tenant_disabled``) or enable again."""

    def act(principal: Principal, tenant: Tenant) -> str:
        if action not in ("disable", "enable"):
            raise InvalidRequest(f"unknown action {action[:20]!r} (disable or enable)")
        state = TenantState.disabled if action == "disable" else TenantState.active
        tenants_core.set_state(session, tenant.id, state, now=ctx.clock.now(), principal=principal)
        what = "disabled: its keys are refused until it is enabled" if action == "disable" else "enabled"
        return f"Tenant {tenant.id} {what}."

    return _manage_action(request, ctx, session, tenant_id, csrf_token, act)


def _delete_page(
    request: Request, ctx: Context, session: Session, tenant: Tenant, *, status: int = 200, error: str | None = None
) -> HTMLResponse:
    stored = (CheckpointState.committed.value, CheckpointState.expired.value)
    checkpoints = session.exec(
        select(sa.func.count())
        .select_from(Checkpoint)
        .where(Checkpoint.tenant_id == tenant.id, col(Checkpoint.state).in_(stored))
    ).one()
    keys = session.exec(
        select(sa.func.count()).select_from(ApiKey).where(ApiKey.tenant_id == tenant.id, col(ApiKey.revoked_at).is_(None))
    ).one()
    return _render(
        request,
        "tenant_delete.html",
        status=status,
        t=tenant,
        checkpoints=checkpoints,
        keys=keys,
        quota=_quota_view(session, tenant, ctx.clock.now()),
        action_error=error,
    )


@router.get("/tenants/{tenant_id}/delete", response_class=HTMLResponse)
def delete_confirm_page(request: Request, tenant_id: str, ctx: CtxDep, session: SessionDep) -> HTMLResponse:
    """The confirmation step: what a delete does to this tenant, and a form that needs its id typed."""
    _admin_key_id(request, ctx, session)
    return _delete_page(request, ctx, session, _tenant_or_404(session, tenant_id))


@router.post("/tenants/{tenant_id}/delete", response_class=HTMLResponse)
def delete_tenant(
    request: Request,
    tenant_id: str,
    ctx: CtxDep,
    session: SessionDep,
    confirm: Annotated[str, Form(max_length=200)] = "",
    csrf_token: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    """Delete once the typed ``confirm`` equals the tenant's id; else the confirmation page again (400)."""
    principal = _checked_post(request, ctx, session, csrf_token)
    tenant = _tenant_or_404(session, tenant_id)
    try:
        if confirm.strip() != tenant.id:
            raise InvalidRequest(f"type the tenant's id ({tenant.id}) to confirm the delete")
        res = tenants_core.delete(session, tenant.id, now=ctx.clock.now(), principal=principal)
    except WeightstoreError as exc:
        status, message = _refusal(session, exc)
        return _delete_page(request, ctx, session, _tenant_or_404(session, tenant_id), status=status, error=message)
    message = (
        f"Tenant {tenant.id} deleted: {res.checkpoints_deleted} checkpoint(s) deleted, {res.keys_revoked} key(s) revoked, "
        f"{res.uploads_aborted} upload(s) aborted, {res.exports_cancelled} export(s) cancelled. Its invoices stay readable."
    )
    return _done(request, ctx, "/admin/tenants", message)


@router.post("/tenants/{tenant_id}/trash/restore", response_class=HTMLResponse)
def restore_from_trash(
    request: Request,
    tenant_id: str,
    ctx: CtxDep,
    session: SessionDep,
    checkpoint_id: Annotated[str, Form(max_length=200)] = "",
    ttl_seconds: Annotated[str, Form(max_length=40)] = "",
    csrf_token: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    """The Trash card's Restore button: ``retention.restore_checkpoint`` for a checkpoint of this
    tenant (another tenant's id is refused like a missing one), with the TTL from the form."""
    principal = _checked_post(request, ctx, session, csrf_token)
    tenant = _tenant_or_404(session, tenant_id)
    try:
        ckpt = session.get(Checkpoint, checkpoint_id)
        if ckpt is None or ckpt.tenant_id != tenant.id:
            raise NotFound(f"checkpoint {checkpoint_id[:80]} is not in tenant {tenant.id}'s trash")
        ttl = parse_ttl(ttl_seconds)
        restored = retention.restore_checkpoint(
            session, principal, ckpt.id, settings=ctx.settings, now=ctx.clock.now(), ttl_seconds=ttl, request_id=None
        )
    except WeightstoreError as exc:
        status, message = _refusal(session, exc)
        return _tenant_page(request, ctx, session, tenant_id, status=status, action_error=f"Restore refused: {message}")
    path = TinkerPath(restored.run_id, restored.kind, restored.name)
    until = "no expiry" if restored.expires_at is None else f"expires {restored.expires_at.strftime('%Y-%m-%d %H:%M UTC')}"
    return _done(request, ctx, f"/admin/tenants/{tenant.id}", f"Restored {path} ({until}).")
