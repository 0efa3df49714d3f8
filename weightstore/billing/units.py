"""Units of the billing arithmetic: time in whole epoch seconds, bytes, money, and the one rounding rule.

* Time is measured in whole seconds since the Unix epoch (each boundary floored to the second).
* Usage is an exact integer of **byte-seconds**; it is additive: the byte-seconds of daily buckets
  sum exactly to the window's, and those of tenants sum exactly to the grand total.
* GB = 10**9 bytes; 1 GB-month = 720 GB-hours. Exact cost of a line =
  ``byte_seconds * rate / (10**9 * 720 * 3600)``.
* Money is rounded **once per reported line**, half-even to the cent; a total is the **sum of its
  rounded lines** (so an invoice always adds up). Costs of finer rows are summed exactly before the
  line is rounded.
* Windows and months (the one place every billing endpoint, the admin pages and invoices parse them,
  ``billing_window``/``day_window``/``month_window``): instants are UTC (naive = UTC); a window is cut
  to ``[BILLING_EPOCH, now]`` (nothing is stored before the epoch, nothing is billed in the future) and
  refused if nothing is left of it or it spans more than ``MAX_WINDOW_DAYS``; a month is ``YYYY-MM``
  from ``1970-01`` to ``9999-11`` (the last whose end ``datetime`` can represent). Every refusal is an
  ``InvalidRequest``: the calendar's edges (year 1, year 9999) never overflow into a 500.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction

from weightstore.errors import InvalidRequest

GB = 10**9
HOURS_PER_MONTH = 720  # Tinker's projections: one GB-month = 720 GB-hours
SECONDS_PER_MONTH = HOURS_PER_MONTH * 3600
BYTE_SECONDS_PER_GB_MONTH = GB * SECONDS_PER_MONTH
DAY = 86400
HOUR = 3600
CENT = Decimal("0.01")
SPLIT = 1_000_000
"""Byte sums that could pass 2^63 are kept as two parts, ``(bytes // SPLIT) x f`` and ``(bytes % SPLIT) x f``,
and recombined in Python: SQLite's ``sum`` raises on 64-bit overflow and its products silently turn float
(the ``*_off_hi``/``*_off_lo`` columns of ``usage_day``, the SQLite form of every window sum)."""


def round_cents(value: Decimal | Fraction | int) -> Decimal:
    """Half-even to the cent, exactly (costs are kept as ``Fraction`` until they are rounded)."""
    if isinstance(value, Decimal):
        return value.quantize(CENT, rounding=ROUND_HALF_EVEN)
    cents = round(Fraction(value) * 100)  # Fraction.__round__ is exact and rounds half to even
    return (Decimal(cents) / 100).quantize(CENT)


def epoch(dt: datetime) -> int:
    """Whole seconds since the epoch (floored), the ledger's unit of time."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() // 1)


def from_epoch(seconds: int) -> datetime:
    """The aware UTC instant of whole epoch seconds."""
    return datetime.fromtimestamp(seconds, UTC)


# --- windows and months -------------------------------------------------------------------------
BILLING_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
"""Earliest instant a window covers: the ledger counts seconds since it, and nothing is stored before."""
MAX_WINDOW_DAYS = 3660
"""Longest window one request may ask for (ten years and change)."""
FIRST_MONTH, LAST_MONTH = "1970-01", "9999-11"
"""Invoice months: from the epoch's month to the last whose end (``10000-01-01`` would be next) exists."""
_MONTH = re.compile(r"(?P<year>[0-9]{4})-(?P<month>[0-9]{2})")


def utc(dt: datetime) -> datetime:
    """``dt`` in UTC (naive means UTC). An offset that pushes it off the calendar is an ``InvalidRequest``."""
    if dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    try:
        return dt.astimezone(UTC)
    except OverflowError as exc:
        raise InvalidRequest(f"{dt.isoformat()} is outside the calendar in UTC") from exc


def _days_before(end: datetime, days: int) -> datetime:
    """``end - days``, saturating at ``BILLING_EPOCH`` (so year 1 never underflows)."""
    return end - timedelta(days=days) if end - BILLING_EPOCH > timedelta(days=days) else BILLING_EPOCH


def billing_window(
    since: datetime | None, until: datetime | None, *, now: datetime, default_days: int = 30, max_days: int = MAX_WINDOW_DAYS
) -> tuple[datetime, datetime]:
    """``[since, until)`` cut to ``[BILLING_EPOCH, now]``; without ``since``, ``default_days`` (clamped to
    1..``max_days``) before the end. Refused when nothing is left or it spans more than ``max_days``."""
    end = min(utc(until), now) if until is not None else now  # never bill the future
    start = utc(since) if since is not None else _days_before(end, min(max(default_days, 1), max_days))
    start = max(start, BILLING_EPOCH)
    if end <= start:
        raise InvalidRequest(
            f"empty window: it is cut to [{BILLING_EPOCH.date()}, now] and must end after it starts "
            f"(got {start.isoformat()} .. {end.isoformat()})"
        )
    if end - start > timedelta(days=max_days):
        raise InvalidRequest(f"the window may span at most {max_days} days")
    return start, end


def day_start(d: date) -> datetime:
    """Midnight UTC starting ``d``."""
    return datetime(d.year, d.month, d.day, tzinfo=UTC)


def day_after(t: datetime) -> datetime:
    """``t`` plus one day, saturating at the calendar's last instant (``9999-12-31`` has no next day)."""
    last = datetime.max.replace(tzinfo=UTC)
    return t + timedelta(days=1) if last - t > timedelta(days=1) else last


def day_window(since: date | None, until: date | None, *, now: datetime, days: int) -> tuple[datetime, datetime, datetime]:
    """Whole UTC days ``since..until`` inclusive (the admin pages): ``until`` is cut at today, and
    without ``since`` the window is the ``days`` before it. Returns ``(start, shown_end, measured_end)``:
    the page shows days up to ``shown_end`` (midnight after the last day) and measures up to now."""
    today = utc(now).date()
    shown_end = day_after(day_start(min(until, today) if until is not None else today))
    wanted = day_start(since) if since is not None else _days_before(shown_end, min(max(days, 1), MAX_WINDOW_DAYS))
    start, end = billing_window(wanted, shown_end, now=now)
    return start, shown_end, end


def month_window(month: str) -> tuple[datetime, datetime]:
    """``YYYY-MM`` → [first instant, first instant of the next month) in UTC; other spellings and
    months outside ``FIRST_MONTH``..``LAST_MONTH`` are an ``InvalidRequest``."""
    m = _MONTH.fullmatch(month)
    if m is None or not 1 <= int(m["month"]) <= 12 or not FIRST_MONTH <= month <= LAST_MONTH:
        raise InvalidRequest(f"month must be YYYY-MM from {FIRST_MONTH} to {LAST_MONTH}, got {month[:40]!r}")
    year, mon = int(m["year"]), int(m["month"])
    return datetime(year, mon, 1, tzinfo=UTC), datetime(year + mon // 12, mon % 12 + 1, 1, tzinfo=UTC)
