"""Which tenants are billed: the one rule every billing aggregate, price and month close applies.

Every tenant is billed except operator tenants (``Tenant.operator``: the bootstrap ``admin``, the
service operator's own use; issue 12, part 1). Deleted tenants stay billed (their final invoices).

- All-tenant answers (usage, current usage, projections, physical bytes, Tinker events, the admin
  overview, month closes) leave operator tenants out: the SQL aggregates add ``billed_only_sql``
  whenever no tenant is named, so no caller can forget it.
- A query that names one operator tenant still shows its usage, priced at zero (``Pricing.rate``
  reads ``unbilled_tenant_ids``) and marked not billed.
"""

from __future__ import annotations

from typing import Any

from sqlmodel import Session, col, select

from weightstore.models import Tenant

OPERATOR_IDS_SQL = "SELECT id FROM tenant WHERE operator = :billable_operator"
"""The ids of the tenants that are not billed, as a plain-SQL subquery (binds ``:billable_operator``)."""


def unbilled_tenant_ids(session: Session) -> frozenset[str]:
    """Tenants that are never billed: the operator tenants."""
    return frozenset(session.exec(select(Tenant.id).where(col(Tenant.operator).is_(True))).all())


def billed_tenant_ids(session: Session) -> set[str]:
    """Every tenant that is billed (deleted ones included: their final invoices stay)."""
    return set(session.exec(select(Tenant.id).where(col(Tenant.operator).is_(False))).all())


def billed_only_sql(params: dict[str, Any], column: str = "tenant_id") -> str:
    """``AND <column> NOT IN (operator tenants)`` for a plain-SQL aggregate over every tenant; binds
    its parameter into ``params``. A tenant id without a tenant row stays billed (fails visible)."""
    params["billable_operator"] = True
    return f" AND {column} NOT IN ({OPERATOR_IDS_SQL})"
