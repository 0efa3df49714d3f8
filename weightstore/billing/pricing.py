"""Prices: USD per GB-month, by tenant override, then per checkpoint kind, then the default; zero for
a tenant that is not billed (``weightstore.billing.billable``).

Prices come from the settings and the ``tenant.price_per_gb_month_usd`` override only; billing is
the ledger times these rates (docs/design-billing.md §1, §5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction

from sqlmodel import Session, col, select

from weightstore.billing.billable import unbilled_tenant_ids
from weightstore.billing.units import BYTE_SECONDS_PER_GB_MONTH
from weightstore.models import Tenant
from weightstore.settings import Settings

NOT_BILLED = Decimal("0")
"""The rate of a tenant that is not billed (an operator tenant): its usage shows, at $0."""


@dataclass(frozen=True)
class Pricing:
    """USD per GB-month. Precedence: tenant override, then per-kind price, then the default."""

    default: Decimal
    """The price of every (tenant, kind) not named below."""
    per_kind: dict[str, Decimal] = field(default_factory=dict)
    """Price per checkpoint kind (settings)."""
    per_tenant: dict[str, Decimal] = field(default_factory=dict)
    """Price per tenant, for all its kinds (the tenant row's override)."""
    unbilled: frozenset[str] = frozenset()
    """Tenants that are not billed (``billable.unbilled_tenant_ids``): their rate is zero, whatever else says."""

    def billed(self, tenant_id: str) -> bool:
        """Whether this tenant is billed (an operator tenant is not)."""
        return tenant_id not in self.unbilled

    def rate(self, tenant_id: str | None, kind: str | None) -> Decimal:
        """USD per GB-month of this tenant's checkpoints of this kind (zero for a tenant not billed)."""
        if tenant_id is not None and tenant_id in self.unbilled:
            return NOT_BILLED
        if tenant_id is not None and tenant_id in self.per_tenant:
            return self.per_tenant[tenant_id]
        if kind is not None and kind in self.per_kind:
            return self.per_kind[kind]
        return self.default

    def cost(self, byte_seconds: int, tenant_id: str | None, kind: str | None) -> Fraction:
        """Exact (unrounded) cost of ``byte_seconds``: a ``Fraction``, so sums of costs stay exact."""
        return Fraction(byte_seconds) * Fraction(self.rate(tenant_id, kind)) / BYTE_SECONDS_PER_GB_MONTH


def _decimal(x: float) -> Decimal:
    return Decimal(str(x))  # 0.1 → Decimal("0.1"), not the binary float's expansion


def load_pricing(session: Session, settings: Settings) -> Pricing:
    """The prices in force: the settings' default and per-kind prices, and every tenant override."""
    overrides = session.exec(
        select(Tenant.id, Tenant.price_per_gb_month_usd).where(col(Tenant.price_per_gb_month_usd).is_not(None))
    ).all()
    return Pricing(
        default=_decimal(settings.price_per_gb_month_usd),
        per_kind={k: _decimal(v) for k, v in settings.price_per_kind_usd.items()},
        per_tenant={t: _decimal(p) for t, p in overrides if p is not None},
        unbilled=unbilled_tenant_ids(session),
    )


class RateCache:
    """``(numerator, denominator)`` of each (tenant, kind)'s price per byte-second, computed once.

    Exact cost without a ``Fraction`` per row: a rate is num/den USD per byte-second, so the costs of
    one output row are kept as integer numerators per denominator and become Fractions once."""

    def __init__(self, pricing: Pricing) -> None:
        self.pricing = pricing
        self.cache: dict[tuple[str, str], tuple[int, int]] = {}

    def get(self, tenant_id: str, kind: str) -> tuple[int, int]:
        """``(numerator, denominator)`` of USD per byte-second."""
        parts = self.cache.get((tenant_id, kind))
        if parts is None:
            f = Fraction(self.pricing.rate(tenant_id, kind)) / BYTE_SECONDS_PER_GB_MONTH
            parts = self.cache[(tenant_id, kind)] = (f.numerator, f.denominator)
        return parts
