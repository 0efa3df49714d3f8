"""Admin web UI at ``/admin``: server-rendered (Jinja2), no JavaScript, no CDN, charts as inline SVG.

Sign-in takes an admin API key in a POST form (never in a URL, never logged) and starts a
server-side session (``weightstore.uisessions``): the cookie carries only a random session id, every
page checks the session row (not ended, not expired or idle, its key still an unrevoked admin key),
and sign-out or the key's revocation ends it for every copy of the cookie. Every state-changing POST
(sign-in, sign-out) must be same-origin (``Origin``, else ``Referer``, against the request's own host
or ``public_url``) and carry a CSRF token: the session's, or before sign-in one tied to a
double-submit cookie. Cookies are HttpOnly, SameSite=Strict and Secure on https. Every number comes
from ``weightstore.billing`` (SQL aggregates over the ledger), so pages stay fast on large catalogs.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape
from sqlmodel import Session, col, select

from weightstore import auth, bootstrap, retention, uisessions
from weightstore import tenants as tenants_core
from weightstore.billing import catalog, invoices, usage
from weightstore.billing.overview import overview as all_tenants_overview
from weightstore.billing.pricing import load_pricing
from weightstore.billing.units import DAY, GB, day_window
from weightstore.context import Context
from weightstore.errors import AuthenticationFailed, Forbidden, InvalidRequest, NotFound, WeightstoreError
from weightstore.models import Tenant

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
    now = ctx.clock.now()
    _admin_key_id(request, ctx, session)
    prices = load_pricing(session, ctx.settings)
    # operator tenants are not billed (issue 12, part 1)
    tenants = [t.id for t in session.exec(select(Tenant).where(col(Tenant.operator).is_(False)).order_by(Tenant.id))]
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
    for tid in sorted(set(tenants) | set(cur)):
        c = cur.get(tid)
        pts = usage.series(by_tenant.get(tid, []), start=start, end=now)
        gb = [p["average_gb"] for p in pts]
        first, last = sum(gb[: len(gb) // 2]), sum(gb[len(gb) // 2 :])
        trend = None if first == 0 else (last - first) / first * 100
        logical = c.logical_bytes if c else 0
        rows.append(
            {
                "tenant": tid,
                "checkpoints": c.checkpoint_count if c else 0,
                "gb": logical / GB,
                "physical_gb": physical.get(tid, 0) / GB,
                "monthly": _fmt_money(c.monthly_cost_usd if c else 0),
                "trend": trend,
                "spark": sparkline(gb),
            }
        )
    total_monthly = sum((r.monthly_cost_usd for r in cur.values()), Decimal("0.00"))
    return _render(
        request,
        "overview.html",
        rows=rows,
        now=now,
        total_monthly=_fmt_money(total_monthly),
        total_gb=sum(r["gb"] for r in rows),
        trend_days=TREND_DAYS,
    )


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
    now = ctx.clock.now()
    # the one window rule (weightstore.billing.units): until cut at today, since at 1970, refusals 400
    _admin_key_id(request, ctx, session)
    try:
        start, shown_end, end = day_window(_parse_day(since), _parse_day(until), now=now, days=days)
    except InvalidRequest as exc:
        raise PageError(exc) from None
    tenant = _tenant_or_404(session, tenant_id)
    prices = load_pricing(session, ctx.settings)
    daily = usage.usage(session, prices, start=start, end=end, group_by=(), bucket_seconds=DAY, tenant_id=tenant.id)
    by_run = usage.usage(session, prices, start=start, end=end, group_by=("run_id",), tenant_id=tenant.id)
    by_kind = usage.usage(session, prices, start=start, end=end, group_by=("kind",), tenant_id=tenant.id)
    cur_run = {r.key["run_id"]: r for r in usage.current(session, prices, now=now, group_by=("run_id",), tenant_id=tenant.id)}
    cur_kind = {r.key["kind"]: r for r in usage.current(session, prices, now=now, group_by=("kind",), tenant_id=tenant.id)}
    physical = catalog.physical_current(session, now=now, tenant_id=tenant.id).get(tenant.id, 0)
    largest = catalog.largest_checkpoints(session, tenant_id=tenant.id, now=now)
    expiring = catalog.expiring_soon(session, tenant_id=tenant.id, now=now)
    trash = retention.trash_of(session, tenant.id, now=now, settings=ctx.settings)
    rate = prices.rate(tenant.id, None)
    points = usage.series(daily, start=start, end=end)
    logical = sum(r.logical_bytes for r in cur_kind.values())

    def breakdown(rows: list[usage.UsageRow], cur: dict[str, usage.CurrentRow], col: str) -> list[dict[str, Any]]:
        out = []
        for name in sorted({r.key[col] for r in rows} | set(cur)):
            u = next((r for r in rows if r.key[col] == name), None)
            c = cur.get(name)
            out.append(
                {
                    "name": name,
                    "gb_hours": float(u.gb_hours) if u else 0.0,
                    "cost": _fmt_money(u.cost_usd if u else 0),
                    "current_gb": (c.logical_bytes if c else 0) / GB,
                    "count": c.checkpoint_count if c else 0,
                    "monthly": _fmt_money(c.monthly_cost_usd if c else 0),
                }
            )
        return out

    months = []
    m = date(start.year, start.month, 1)
    while m <= end.date():
        months.append(f"{m.year:04d}-{m.month:02d}")
        m = date(m.year + (m.month == 12), m.month % 12 + 1, 1)
    return _render(
        request,
        "tenant.html",
        tenant=tenant.id,
        now=now,
        start=start.date(),
        end=(shown_end - timedelta(days=1)).date(),
        windows=WINDOWS,
        days=(shown_end - start).days,
        chart=daily_chart(points),
        points=points,
        window_cost=_fmt_money(sum((Decimal(p["cost_usd"]) for p in points), Decimal("0.00"))),
        window_gb_hours=sum(p["gb_hours"] for p in points),
        runs=breakdown(by_run, cur_run, "run_id"),
        kinds=breakdown(by_kind, cur_kind, "kind"),
        largest=largest,
        expiring=expiring,
        trash=trash,
        logical_gb=logical / GB,
        physical_gb=physical / GB,
        saving_gb=max(0, logical - physical) / GB,
        logical_bytes=logical,
        physical_bytes=physical,
        saving_bytes=max(0, logical - physical),
        saving_pct=(100 * (logical - physical) / logical) if logical else 0.0,
        monthly=_fmt_money(sum((c.monthly_cost_usd for c in cur_kind.values()), Decimal("0.00"))),
        rate=rate,
        quota=_quota_view(session, tenant, now),
        months=list(reversed(months)),
    )


def _quota_view(session: Session, tenant: Tenant, now: datetime) -> dict[str, Any]:
    """The tenant page's quota line (issue 12, part 2): used logical bytes against the soft and hard quota."""
    used = tenants_core.usage(session, tenant.id, now=now).used_bytes
    soft, hard = tenant.soft_quota_bytes, tenant.quota_bytes
    return {
        "state": tenant.state,
        "used_gb": used / GB,
        "soft_gb": None if soft is None else soft / GB,
        "hard_gb": None if hard is None else hard / GB,
        "over_soft": soft is not None and used >= soft,
        "pct": None if not hard else 100 * used / hard,
    }


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
