"""Units of the billing arithmetic: time in whole epoch seconds, bytes, money, and the one rounding rule.

* Time is measured in whole seconds since the Unix epoch (each boundary floored to the second).
* Usage is an exact integer of **byte-seconds**; it is additive: the byte-seconds of daily buckets
  sum exactly to the window's, and those of tenants sum exactly to the grand total.
* GB = 10**9 bytes; 1 GB-month = 720 GB-hours. Exact cost of a line =
  ``byte_seconds * rate / (10**9 * 720 * 3600)``.
* Money is rounded **once per reported line**, half-even to the cent; a total is the **sum of its
  rounded lines** (so an invoice always adds up). Costs of finer rows are summed exactly before the
  line is rounded.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction

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
